//! `load`: precedence, bounds and the one-line refusals.

use super::*;
use crate::cli::StartArgs;
use std::collections::HashMap;

fn args(v: &[&str]) -> StartArgs {
    use clap::Parser;
    crate::cli::Cli::try_parse_from(std::iter::once("lb").chain(v.iter().copied()))
        .unwrap()
        .start
}

fn with_env(a: &StartArgs, vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
    let map: HashMap<String, String> = vars
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .chain([(
            "PATH".to_string(),
            std::env::var("PATH").unwrap_or_default(),
        )])
        .collect();
    load(a, &|k| map.get(k).cloned())
}

fn temp_file(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("lb-config-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn defaults_run_the_bundled_worker_on_every_cpu() {
    let c = with_env(&args(&[]), &[]).unwrap();
    assert_eq!(c.listeners.len(), 1);
    assert_eq!(c.listeners[0].address.to_string(), "127.0.0.1:8000");
    assert_eq!(c.policy, PolicyKind::RoundRobin);
    assert_eq!(c.listeners[0].backlog, defaults::BACKLOG);
    assert_eq!(c.drain_timeout, Duration::from_secs(10));
    assert_eq!(c.ready_timeout, Duration::from_secs(30));
    assert_eq!(c.min_uptime, Duration::from_secs(1));
    assert_eq!(c.worker_log, None);
    assert_eq!(c.proxy_connect_timeout, Duration::from_secs(5));
    assert_eq!(c.proxy_idle_timeout, Some(Duration::from_secs(60)));
    assert_eq!(c.pools.len(), 1);
    assert_eq!(c.pools[0].args, ["hello-worker"]);
    assert_eq!(c.slots(), available_cpus());
}

#[test]
fn cli_beats_env_beats_file() {
    let f = temp_file(
        "prec.toml",
        "policy = \"lc\"\nlisten = \"127.0.0.1:7000\"\nworkers = 3\n",
    );
    let f = f.to_str().unwrap();
    let c = with_env(&args(&["-c", f]), &[]).unwrap();
    assert_eq!(
        (c.policy, c.tcp_listen().unwrap().port(), c.slots()),
        (PolicyKind::LeastConn, 7000, 3)
    );
    let c = with_env(
        &args(&["-c", f]),
        &[("SCHED_POLICY", "WRR"), ("LB_WORKERS", "2")],
    )
    .unwrap();
    assert_eq!((c.policy, c.slots()), (PolicyKind::Weighted, 2));
    let c = with_env(
        &args(&["-c", f, "--policy", "rr", "-w", "5"]),
        &[("SCHED_POLICY", "wrr"), ("LB_WORKERS", "2")],
    )
    .unwrap();
    assert_eq!((c.policy, c.slots()), (PolicyKind::RoundRobin, 5));
}

#[test]
fn bad_values_name_their_origin_on_one_line() {
    let e = with_env(&args(&[]), &[("SCHED_POLICY", "fastest")])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("SCHED_POLICY") && e.contains("fastest") && e.contains("rr"),
        "{e}"
    );
    let e = with_env(&args(&["-w", "0"]), &[]).unwrap_err().to_string();
    assert!(e.contains("--workers") && e.contains("`0`"), "{e}");
    let e = with_env(&args(&["-l", "nonsense"]), &[])
        .unwrap_err()
        .to_string();
    assert!(e.contains("--listen") && e.contains("HOST:PORT"), "{e}");
    let e = with_env(&args(&["--drain-timeout", "soon"]), &[])
        .unwrap_err()
        .to_string();
    assert!(e.contains("--drain-timeout") && !e.contains('\n'), "{e}");
    let e = with_env(&args(&[]), &[("LB_READY_TIMEOUT", "forever")])
        .unwrap_err()
        .to_string();
    assert!(e.contains("LB_READY_TIMEOUT"), "{e}");
    let e = with_env(&args(&["--max-rss", "huge"]), &[])
        .unwrap_err()
        .to_string();
    assert!(e.contains("--max-rss") && e.contains("512MB"), "{e}");
    let c = with_env(
        &args(&[]),
        &[("LB_MAX_RSS", "64M"), ("LB_MAX_CONNS_PER_WORKER", "1000")],
    )
    .unwrap();
    assert_eq!(
        (c.max_rss, c.max_conns_per_worker),
        (Some(64 << 20), Some(1000))
    );
    let e = with_env(&args(&["--backlog", "many"]), &[])
        .unwrap_err()
        .to_string();
    assert!(e.contains("--backlog"), "{e}");
}

/// The first value of each pair is accepted, the second refused with
/// one line naming the flag, the value and the range.
#[test]
fn every_setting_is_bounded() {
    let cases: &[(&str, &str, &str, &str)] = &[
        ("--ready-timeout", "1ms", "0s", "from 1ms to 24h"),
        ("--ready-timeout", "24h", "86400.001", "from 1ms to 24h"),
        ("--ready-timeout", "1440m", "9223372036854775807s", "to 24h"),
        ("--drain-timeout", "86400", "0", "from 1ms to 24h"),
        ("--drain-timeout", "0.001", "2562047788015215h", "to 24h"),
        ("--min-uptime", "0", "25h", "from 0 to 24h"),
        ("--backlog", "65535", "65536", "from 1 to 65535"),
        ("--backlog", "1", "0", "from 1 to 65535"),
        (
            "--max-conns-per-worker",
            "1000000000000",
            "1000000000001",
            "up to 1000000000000",
        ),
        ("--max-rss", "1M", "1023K", "from 1M to 1024G"),
        ("--max-rss", "1024G", "1025G", "from 1M to 1024G"),
        ("--max-conns", "1048576", "1048577", "from 1 to 1048576"),
        ("--reload-parallel", "1024", "1025", "from 1 to 1024"),
        ("--workers", "1", "0", "from 1 to 1024"),
        ("--proxy-connect-timeout", "1ms", "0", "from 1ms to 24h"),
        ("--proxy-connect-timeout", "24h", "25h", "from 1ms to 24h"),
        ("--proxy-idle-timeout", "1ms", "0.5ms", "from 1ms to 24h"),
        ("--proxy-idle-timeout", "24h", "86401", "(0 = off)"),
        ("--proxy-idle-timeout", "0", "never", "(0 = off)"),
    ];
    for &(flag, good, bad, range) in cases {
        assert!(
            with_env(&args(&[flag, good]), &[]).is_ok(),
            "{flag} {good} is accepted"
        );
        let e = with_env(&args(&[flag, bad]), &[]).unwrap_err().to_string();
        assert!(
            e.starts_with(&format!("invalid {flag} `{bad}`: ")) && e.contains(range),
            "{flag} {bad}: {e}"
        );
        assert!(!e.contains('\n'), "{e}");
    }
    let c = with_env(&args(&["--max-rss", "0", "--min-uptime", "0s"]), &[]).unwrap();
    assert_eq!((c.max_rss, c.min_uptime), (None, Duration::ZERO));
    let c = with_env(
        &args(&["--proxy-idle-timeout", "0s"]),
        &[("LB_PROXY_CONNECT_TIMEOUT", "250ms")],
    )
    .unwrap();
    assert_eq!(
        (c.proxy_idle_timeout, c.proxy_connect_timeout),
        (None, Duration::from_millis(250))
    );
    let f = temp_file(
        "proxy-timeouts.toml",
        "proxy_connect_timeout = \"2s\"\nproxy_idle_timeout = \"10m\"\n",
    );
    let c = with_env(&args(&["-c", f.to_str().unwrap()]), &[]).unwrap();
    assert_eq!(
        (c.proxy_connect_timeout, c.proxy_idle_timeout),
        (Duration::from_secs(2), Some(Duration::from_secs(600)))
    );
    let e = with_env(&args(&[]), &[("LB_READY_TIMEOUT", "0ms")])
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("invalid LB_READY_TIMEOUT `0ms`"), "{e}");
}

#[test]
fn pool_weights_ports_args_and_env_are_bounded() {
    let pool = |extra: &str| {
        let f = temp_file(
            "pool-bounds.toml",
            &format!("[[pool]]\ncommand = \"sh\"\n{extra}\n"),
        );
        with_env(&args(&["-c", f.to_str().unwrap()]), &[]).map_err(|e| e.to_string())
    };
    assert_eq!(pool("weight = 10000").unwrap().pools[0].weight, 10000);
    let e = pool("weight = 10001").unwrap_err();
    assert!(
        e.contains("`weight`") && e.contains("from 1 to 10000"),
        "{e}"
    );
    let e = pool("port = 0").unwrap_err();
    assert!(e.contains("`port`") && e.contains("1 to 65535"), "{e}");
    let e = pool("args = [\"a\\u0000b\"]").unwrap_err();
    assert!(e.contains("`args`") && e.contains("NUL"), "{e}");
    let e = pool("env = { \"A=B\" = \"1\" }").unwrap_err();
    assert!(e.contains("`env`") && e.contains("A=B=1"), "{e}");
    assert!(pool("env = { A = \"x=y\" }").is_ok());
}

#[test]
fn control_characters_in_values_are_shown_escaped() {
    let e = with_env(&args(&["--policy", "a\nb\r"]), &[])
        .unwrap_err()
        .to_string();
    assert!(e.contains("`a\\nb\\r`") && e.lines().count() == 1, "{e}");
    let e = with_env(&args(&["-c", "/no/such\ndir/lb.toml"]), &[])
        .unwrap_err()
        .to_string();
    assert!(e.contains("such\\ndir") && e.lines().count() == 1, "{e}");
}

#[test]
fn stop_signals_parse_by_name_or_number() {
    assert_eq!(parse::signal("SIGQUIT"), Some(libc::SIGQUIT));
    assert_eq!(parse::signal("quit"), Some(libc::SIGQUIT));
    assert_eq!(parse::signal(" 15 "), Some(libc::SIGTERM));
    assert_eq!(
        parse::signal("SIGKILL"),
        None,
        "not catchable: no graceful stop"
    );
    assert_eq!(parse::signal("SIGNOPE"), None);
}

#[test]
fn missing_command_is_refused() {
    let e = with_env(&args(&["--", "no-such-program-xyz"]), &[])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("no-such-program-xyz") && e.contains("not found in PATH"),
        "{e}"
    );
    let e = with_env(&args(&["--", "/nonexistent/prog"]), &[])
        .unwrap_err()
        .to_string();
    assert!(e.contains("does not exist"), "{e}");
    let c = with_env(&args(&["--", "sh", "-c", "true"]), &[]).unwrap();
    assert!(c.pools[0].command.is_absolute());
    assert_eq!(c.pools[0].args, ["-c", "true"]);
}

#[test]
fn pools_with_weights_and_env() {
    let f = temp_file(
        "pools.toml",
        "[[pool]]\nname=\"main\"\ncommand=\"sh\"\ncount=3\nweight=3\nenv={A=\"1\"}\n\
         [[pool]]\nname=\"canary\"\ncommand=\"sh\"\ncount=1\n",
    );
    let c = with_env(&args(&["-c", f.to_str().unwrap()]), &[]).unwrap();
    assert_eq!(c.slots(), 4);
    assert_eq!(c.slot_pools(), [0, 0, 0, 1]);
    assert_eq!((c.pools[0].weight, c.pools[1].weight), (3, 1));
    assert_eq!(c.pools[0].env, [("A".to_string(), "1".to_string())]);
    let e = with_env(&args(&["-c", f.to_str().unwrap(), "-w", "2"]), &[])
        .unwrap_err()
        .to_string();
    assert!(e.contains("--workers") && e.contains("2 pools"), "{e}");
}

#[test]
fn file_errors_name_file_and_line() {
    let f = temp_file("bad.toml", "listen = \"127.0.0.1:1\"\npolcy = \"rr\"\n");
    let e = with_env(&args(&["-c", f.to_str().unwrap()]), &[])
        .unwrap_err()
        .to_string();
    assert!(e.contains("bad.toml:2:") && e.contains("polcy"), "{e}");
    let f = temp_file("zero.toml", "[[pool]]\ncommand=\"sh\"\nweight=0\n");
    let e = with_env(&args(&["-c", f.to_str().unwrap()]), &[])
        .unwrap_err()
        .to_string();
    assert!(e.contains("weight"), "{e}");
    let e = with_env(&args(&["-c", "/nonexistent/lb.toml"]), &[])
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("cannot read config file /nonexistent/lb.toml"),
        "{e}"
    );
}

#[test]
fn bare_numbers_in_the_file_are_seconds_and_bytes() {
    let f = temp_file(
        "bare.toml",
        "drain_timeout = 5\nmin_uptime = 0.5\nstall_timeout = 0\nmax_rss = 1073741824\n",
    );
    let c = with_env(&args(&["-c", f.to_str().unwrap()]), &[]).unwrap();
    assert_eq!(c.drain_timeout, Duration::from_secs(5));
    assert_eq!(c.min_uptime, Duration::from_millis(500));
    assert_eq!(c.max_rss, Some(1 << 30));
    // The same values as text, from the environment and the command line.
    let c = with_env(
        &args(&["--drain-timeout", "1m30s"]),
        &[("LB_MAX_RSS", "1.5G")],
    )
    .unwrap();
    assert_eq!(c.drain_timeout, Duration::from_secs(90));
    assert_eq!(c.max_rss, Some(3 << 29));
    let f = temp_file("negative.toml", "drain_timeout = -5\n");
    let e = with_env(&args(&["-c", f.to_str().unwrap()]), &[])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("drain_timeout") && e.contains("give a duration"),
        "{e}"
    );
}

#[test]
fn proxy_protocol_settings_and_their_refusals() {
    let c = with_env(&args(&[]), &[]).unwrap();
    let rules = &c.listeners[0].proxy;
    assert_eq!(rules.protocol, ProxyProtocol::Off);
    assert!(rules.trusted.is_empty());
    assert_eq!(rules.untrusted, Untrusted::Refuse);
    assert_eq!(c.proxy_header_timeout, Duration::from_secs(3));
    assert_eq!(c.pools[0].send_proxy, SendProxy::Off);

    let c = with_env(
        &args(&[
            "--proxy-protocol",
            "v2",
            "--proxy-trusted",
            "10.0.0.0/8,::1",
        ]),
        &[("LB_PROXY_HEADER_TIMEOUT", "500ms")],
    )
    .unwrap();
    assert_eq!(c.listeners[0].proxy.protocol, ProxyProtocol::V2);
    assert_eq!(c.listeners[0].proxy.trusted.len(), 2);
    assert_eq!(c.proxy_header_timeout, Duration::from_millis(500));

    // On, with nobody trusted and untrusted refused: every connection would be.
    let e = with_env(&args(&["--proxy-protocol", "any"]), &[])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("--proxy-trusted") && e.contains("--proxy-untrusted serve"),
        "{e}"
    );
    assert!(!e.contains('\n'));
    with_env(
        &args(&["--proxy-protocol", "any", "--proxy-untrusted", "serve"]),
        &[],
    )
    .unwrap();

    let e = with_env(&args(&["--proxy-protocol", "v3"]), &[])
        .unwrap_err()
        .to_string();
    assert!(e.contains("off, v1, v2 or any"), "{e}");
    let e = with_env(&args(&[]), &[("LB_PROXY_TRUSTED", "10.0.0.1/8")])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("LB_PROXY_TRUSTED") && e.contains("10.0.0.0/8"),
        "{e}"
    );

    // Kernel dispatch: the workers would read the header themselves.
    let e = with_env(
        &args(&[
            "--proxy-protocol",
            "v1",
            "--proxy-trusted",
            "127.0.0.1",
            "--dispatch",
            "kernel",
        ]),
        &[],
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("--dispatch master"), "{e}");

    // So would shared-mode workers.
    let e = with_env(
        &args(&[
            "--proxy-protocol",
            "v1",
            "--proxy-trusted",
            "127.0.0.1",
            "--mode",
            "shared",
            "--",
            "true",
        ]),
        &[],
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("mode shared") && e.contains("proxy_protocol off"),
        "{e}"
    );

    // send_proxy is proxy mode's only.
    let e = with_env(&args(&["--send-proxy", "v1"]), &[])
        .unwrap_err()
        .to_string();
    assert!(e.contains("use mode proxy"), "{e}");
    let c = with_env(
        &args(&[
            "--send-proxy",
            "v2",
            "--mode",
            "proxy",
            "--",
            "true",
            "{port}",
        ]),
        &[],
    )
    .unwrap();
    assert_eq!(c.pools[0].send_proxy, SendProxy::V2);

    let f = temp_file(
        "proxy.toml",
        "proxy_protocol = \"v1\"\nproxy_trusted = [\"10.0.0.0/8\", \"fd00::/8\"]\n\
         send_proxy = \"v1\"\n\
         [[pool]]\ncommand = \"true\"\nargs = [\"{port}\"]\nmode = \"proxy\"\n\
         [[pool]]\ncommand = \"true\"\nargs = [\"{port}\"]\nmode = \"proxy\"\nsend_proxy = \"off\"\n",
    );
    let c = with_env(&args(&["-c", f.to_str().unwrap()]), &[]).unwrap();
    assert_eq!(c.listeners[0].proxy.trusted.len(), 2);
    assert_eq!(
        (c.pools[0].send_proxy, c.pools[1].send_proxy),
        (SendProxy::V1, SendProxy::Off)
    );
}
