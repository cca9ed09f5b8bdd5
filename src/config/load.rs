//! [`load`]: each setting of the table through its layers, then the pools
//! and the limits that span settings.

use super::pools::pools;
use super::settings::{self as s};
use super::sources::Sources;
use super::{Config, ConfigError, EnvFn, Origins, defaults};
use crate::cli::StartArgs;

/// Merges and validates. `env` looks up environment variables.
pub fn load(args: &StartArgs, env: EnvFn<'_>) -> Result<Config, ConfigError> {
    let mut src = Sources::new(args, env);
    src.read_file()?;

    // The file's [[listen]] tables first: a mistake in one is named by its
    // key, before its address list is read.
    let file_tables = match src.file.listen.as_ref() {
        Some(file) => super::listen::tables(file, &src.in_file("listen"))?,
        None => Vec::new(),
    };
    let (addresses, listen_origin) = src.value_and_origin(&s::LISTEN)?;
    let backlog = src.value(&s::BACKLOG)?;
    let (policy, policy_origin) = src.value_and_origin(&s::POLICY)?;
    let mode = src.given(&s::MODE)?;
    let send_proxy = src.given(&s::SEND_PROXY)?;
    let drain_timeout = src.value(&s::DRAIN_TIMEOUT)?;
    let ready_timeout = src.value(&s::READY_TIMEOUT)?;
    let min_uptime = src.value(&s::MIN_UPTIME)?;
    let (worker_log, worker_log_origin) = src.optional(&s::WORKER_LOG)?;
    let max_conns_per_worker = src.given(&s::MAX_CONNS_PER_WORKER)?.and_then(|v| v.0);
    let max_rss = src.given(&s::MAX_RSS)?.and_then(|v| v.0);
    let reload_parallel = src.value(&s::RELOAD_PARALLEL)?;
    let worker_queue = src.value(&s::WORKER_QUEUE)?;
    let stall_timeout = src.value(&s::STALL_TIMEOUT)?;
    let (max_conns, max_conns_origin) = src.value_and_origin(&s::MAX_CONNS)?;
    let proxy_connect_timeout = src.value(&s::PROXY_CONNECT_TIMEOUT)?;
    let proxy_idle_timeout = src.value(&s::PROXY_IDLE_TIMEOUT)?;
    let proxy_protocol = src.value(&s::PROXY_PROTOCOL)?;
    let proxy_trusted = src.optional(&s::PROXY_TRUSTED)?.0.unwrap_or_default();
    let proxy_untrusted = src.value(&s::PROXY_UNTRUSTED)?;
    let proxy_header_timeout = src.value(&s::PROXY_HEADER_TIMEOUT)?;
    // A [[listen]] table's settings go with the file's own list only: a
    // list from the command line or the environment replaces it whole.
    let tables = match listen_origin {
        super::Origin::File(..) => file_tables,
        _ => Vec::new(),
    };
    let listeners = super::listen::listeners(
        addresses,
        tables,
        &super::listen::Defaults {
            backlog,
            proxy: super::ProxyRules {
                protocol: proxy_protocol,
                trusted: proxy_trusted,
                untrusted: proxy_untrusted,
            },
        },
        &listen_origin,
    )?;
    let metrics = src.given(&s::METRICS)?.map(|v| v.0);
    let (control, control_origin) = src.optional(&s::CONTROL)?;
    let workers = src.given(&s::WORKERS)?;
    let dispatch = src.value(&s::DISPATCH)?;
    let min_ready = src.value(&s::MIN_READY)?;
    let log_format = src.value(&s::LOG_FORMAT)?;
    let log_timestamps = src.value(&s::LOG_TIMESTAMPS)?;
    let (log_file, log_file_origin) = src.optional(&s::LOG_FILE)?;
    let run_as = super::run_as::Wanted {
        user: src.given(&s::USER)?,
        group: src.given(&s::GROUP)?,
        cwd: src.given(&s::CWD)?,
        umask: src.given(&s::UMASK)?,
    };
    let max_conns_per_worker_jitter = src.value_or(&s::MAX_CONNS_PER_WORKER_JITTER, 0)?;
    if max_conns_per_worker_jitter > 0 && max_conns_per_worker.is_none() {
        return Err(ConfigError::Conflict(
            "max_conns_per_worker_jitter is set but max_conns_per_worker is not: the jitter \
             spreads that limit; set --max-conns-per-worker too, or drop the jitter"
                .into(),
        ));
    }
    let (watch, watch_origin) = src.optional(&s::WATCH)?;
    let watch = watch.unwrap_or_default();
    if let Some(missing) = watch.iter().find(|p| !p.exists()) {
        return Err(super::invalid(
            watch_origin,
            &missing.display().to_string(),
            "does not exist; give files or directories that do, comma-separated",
        ));
    }

    let config = Config {
        listeners,
        policy,
        drain_timeout,
        ready_timeout,
        min_uptime,
        worker_log,
        control,
        max_conns_per_worker,
        max_rss,
        metrics,
        reload_parallel,
        worker_queue,
        stall_timeout,
        max_conns,
        proxy_connect_timeout,
        proxy_idle_timeout,
        proxy_header_timeout,
        min_ready,
        pools: pools(&src, workers, mode, send_proxy, &run_as)?,
        dispatch,
        log_format,
        log_timestamps,
        log_file,
        max_conns_per_worker_jitter,
        watch,
        policy_explicit: !matches!(policy_origin, super::Origin::Default(_)),
        origins: Origins {
            worker_log: worker_log_origin,
            control: control_origin,
            max_conns: max_conns_origin,
            log_file: log_file_origin,
        },
    };
    super::Dispatch::check(&config)?;
    super::proxy::check(&config)?;
    if config.slots() > defaults::MAX_WORKERS {
        return Err(ConfigError::Conflict(format!(
            "{} workers in all is more than the {} one master runs; lower the pools' `count`",
            config.slots(),
            defaults::MAX_WORKERS
        )));
    }
    if config.min_ready > config.slots() {
        return Err(ConfigError::Conflict(format!(
            "min_ready is {} but there are {} workers in all, so /readyz could never answer \
             200; lower min_ready or add workers",
            config.min_ready,
            config.slots()
        )));
    }
    Ok(config)
}
