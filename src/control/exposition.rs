//! The Prometheus text format's syntax: families (`# HELP`, `# TYPE`) and
//! samples with quoted label values; `prometheus.rs` says what is in them.

use std::fmt::Write as _;

/// The text being written.
pub(super) struct Exposition(pub String);

impl Exposition {
    pub fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        self.0.push_str(name);
        if !labels.is_empty() {
            self.0.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.0.push(',');
                }
                let _ = write!(self.0, "{k}=\"{}\"", escape(v));
            }
            self.0.push('}');
        }
        let _ = writeln!(self.0, " {value}");
    }
}

/// A label value as the text format quotes it (pool names are the user's).
fn escape(v: &str) -> std::borrow::Cow<'_, str> {
    if v.contains(['\\', '"', '\n']) {
        v.replace('\\', "\\\\")
            .replace('"', "\\\"")
            .replace('\n', "\\n")
            .into()
    } else {
        v.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sample_is_a_line_with_its_labels_quoted() {
        let mut o = Exposition(String::new());
        o.family("x_total", "counter", "Things.");
        o.sample("x_total", &[], 3);
        o.sample("x_total", &[("pool", "a\"b\\c\nd"), ("slot", "0")], 1.5);
        assert_eq!(
            o.0,
            "# HELP x_total Things.\n# TYPE x_total counter\nx_total 3\n\
             x_total{pool=\"a\\\"b\\\\c\\nd\",slot=\"0\"} 1.5\n"
        );
        assert_eq!(escape("web"), "web");
    }
}
