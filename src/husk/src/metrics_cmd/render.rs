//! Prometheus' text exposition format, version 0.0.4: each family once,
//! its `# HELP` and `# TYPE` lines first and all its samples together
//! (pods add their samples family by family, so they are gathered here
//! and written at the end), label values and help text escaped.

use std::collections::HashMap;
use std::fmt::Write;

/// The Content-Type of what [`Exposition::render`] writes.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A family's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Only goes up (names end in `_total`).
    Counter,
    /// Goes up and down.
    Gauge,
    /// Buckets, a sum and a count.
    Histogram,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// A sample's labels, in order: name and value.
pub type Labels = Vec<(&'static str, String)>;

#[derive(Debug)]
struct Sample {
    /// `_bucket`, `_sum`, `_count` of a histogram; empty otherwise.
    suffix: &'static str,
    labels: Labels,
    value: String,
}

#[derive(Debug)]
struct Family {
    name: &'static str,
    help: &'static str,
    kind: Kind,
    samples: Vec<Sample>,
}

/// Families in the order they were first used, each with its samples.
#[derive(Debug, Default)]
pub struct Exposition {
    families: Vec<Family>,
    index: HashMap<&'static str, usize>,
}

impl Exposition {
    fn family(&mut self, name: &'static str, help: &'static str, kind: Kind) -> &mut Family {
        let i = *self.index.entry(name).or_insert_with(|| {
            self.families.push(Family {
                name,
                help,
                kind,
                samples: Vec::new(),
            });
            self.families.len() - 1
        });
        let family = &mut self.families[i];
        debug_assert_eq!(family.kind, kind, "{name} used as two kinds");
        family
    }

    /// Declares a family with no sample yet (so its HELP and TYPE show
    /// even before it has one).
    pub fn declare(&mut self, name: &'static str, help: &'static str, kind: Kind) {
        self.family(name, help, kind);
    }

    /// A counter's sample (`name` ends in `_total`).
    pub fn counter(&mut self, name: &'static str, help: &'static str, labels: Labels, value: u64) {
        debug_assert!(name.ends_with("_total"), "counter {name} lacks _total");
        self.family(name, help, Kind::Counter).samples.push(Sample {
            suffix: "",
            labels,
            value: value.to_string(),
        });
    }

    /// A gauge's sample.
    pub fn gauge(&mut self, name: &'static str, help: &'static str, labels: Labels, value: f64) {
        self.family(name, help, Kind::Gauge).samples.push(Sample {
            suffix: "",
            labels,
            value: float(value),
        });
    }

    /// A histogram: cumulative counts per upper bound (`+Inf` is added,
    /// holding `count`), the sum and the count.
    pub fn histogram(
        &mut self,
        name: &'static str,
        help: &'static str,
        labels: Labels,
        buckets: &[(f64, u64)],
        count: u64,
        sum: f64,
    ) {
        let family = self.family(name, help, Kind::Histogram);
        let bucket = |le: String, n: u64| {
            let mut l = labels.clone();
            l.push(("le", le));
            Sample {
                suffix: "_bucket",
                labels: l,
                value: n.to_string(),
            }
        };
        for (le, n) in buckets {
            family.samples.push(bucket(float(*le), *n));
        }
        family.samples.push(bucket("+Inf".into(), count));
        family.samples.push(Sample {
            suffix: "_sum",
            labels: labels.clone(),
            value: float(sum),
        });
        family.samples.push(Sample {
            suffix: "_count",
            labels,
            value: count.to_string(),
        });
    }

    /// The whole exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for f in &self.families {
            let _ = writeln!(out, "# HELP {} {}", f.name, escape_help(f.help));
            let _ = writeln!(out, "# TYPE {} {}", f.name, f.kind.name());
            for s in &f.samples {
                out.push_str(f.name);
                out.push_str(s.suffix);
                if !s.labels.is_empty() {
                    out.push('{');
                    for (i, (k, v)) in s.labels.iter().enumerate() {
                        if i > 0 {
                            out.push(',');
                        }
                        let _ = write!(out, "{k}=\"{}\"", escape_label(v));
                    }
                    out.push('}');
                }
                out.push(' ');
                out.push_str(&s.value);
                out.push('\n');
            }
        }
        out
    }
}

/// A float as Prometheus reads it (Go's ParseFloat): `NaN`, `+Inf`,
/// `-Inf`, else Rust's shortest exact decimal (no exponent).
fn float(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else {
        format!("{v}")
    }
}

/// A label value: backslash, double quote and line feed escaped.
pub fn escape_label(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// Help text: backslash and line feed escaped.
fn escape_help(v: &str) -> String {
    v.replace('\\', "\\\\").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_and_help_are_escaped() {
        assert_eq!(escape_label(r#"a"b\c"#), r#"a\"b\\c"#);
        assert_eq!(escape_label("two\nlines"), "two\\nlines");
        assert_eq!(escape_label("ünïcode ok"), "ünïcode ok");
        let mut e = Exposition::default();
        e.gauge(
            "husk_x",
            "back\\slash\nand a line",
            vec![("pod", "we\"ird\\\n".into())],
            1.5,
        );
        assert_eq!(
            e.render(),
            "# HELP husk_x back\\\\slash\\nand a line\n# TYPE husk_x gauge\nhusk_x{pod=\"we\\\"ird\\\\\\n\"} 1.5\n"
        );
    }

    #[test]
    fn samples_of_a_family_stay_together_in_first_use_order() {
        let mut e = Exposition::default();
        let pod = |p: &str| vec![("pod", p.to_string())];
        e.counter("husk_a_total", "A.", pod("p1"), 1);
        e.gauge("husk_b", "B.", pod("p1"), 2.0);
        e.counter("husk_a_total", "A.", pod("p2"), 3);
        e.declare("husk_c_total", "C.", Kind::Counter);
        e.gauge("husk_b", "B.", vec![], f64::NAN);
        let text = e.render();
        assert_eq!(
            text,
            "# HELP husk_a_total A.\n# TYPE husk_a_total counter\n\
             husk_a_total{pod=\"p1\"} 1\nhusk_a_total{pod=\"p2\"} 3\n\
             # HELP husk_b B.\n# TYPE husk_b gauge\nhusk_b{pod=\"p1\"} 2\nhusk_b NaN\n\
             # HELP husk_c_total C.\n# TYPE husk_c_total counter\n"
        );
    }

    #[test]
    fn a_histogram_has_cumulative_buckets_inf_sum_and_count() {
        let mut e = Exposition::default();
        e.histogram(
            "husk_h_seconds",
            "H.",
            vec![("node", "n".into())],
            &[(0.5, 1), (1.0, 3), (2.5, 3)],
            5,
            42.25,
        );
        let text = e.render();
        let want = "# HELP husk_h_seconds H.\n# TYPE husk_h_seconds histogram\n\
            husk_h_seconds_bucket{node=\"n\",le=\"0.5\"} 1\n\
            husk_h_seconds_bucket{node=\"n\",le=\"1\"} 3\n\
            husk_h_seconds_bucket{node=\"n\",le=\"2.5\"} 3\n\
            husk_h_seconds_bucket{node=\"n\",le=\"+Inf\"} 5\n\
            husk_h_seconds_sum{node=\"n\"} 42.25\n\
            husk_h_seconds_count{node=\"n\"} 5\n";
        assert_eq!(text, want);
    }

    #[test]
    fn floats_read_back_in_go_s_syntax() {
        assert_eq!(float(f64::INFINITY), "+Inf");
        assert_eq!(float(f64::NEG_INFINITY), "-Inf");
        assert_eq!(float(1e-7), "0.0000001");
        assert_eq!(float(3.0), "3");
        assert_eq!(float(1e21), "1000000000000000000000");
    }
}
