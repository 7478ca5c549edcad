//! Metrics as Prometheus' text format 0.0.4 reads them.
//!
//! prometheus-client writes OpenMetrics text: a counter's `# TYPE` and
//! `# HELP` lines name it without the `_total` its samples carry, and
//! there are `# UNIT` and `# EOF` lines. Prometheus' classic parser, the
//! one node_exporter's textfile collector and `promtool check metrics`
//! use, then sees a counter with no samples and samples of no type: every
//! counter loses its type and its help. [`classic`] rewrites the text so
//! that both formats' readers agree.

use std::collections::HashSet;

/// `openmetrics` (as prometheus-client writes it) in text format 0.0.4:
/// counters' `HELP` and `TYPE` lines name their samples (`_total`),
/// `UNIT` and `EOF` lines are left out; the rest is as it was.
pub fn classic(openmetrics: &str) -> String {
    let counters: HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
            counters
                .contains(name)
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        match renamed {
            Some(l) => out.push_str(l.trim_end()),
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_named_by_their_samples_and_openmetrics_lines_go() {
        let om = "# HELP jobs Jobs done.\n# TYPE jobs counter\njobs_total{q=\"a\"} 3\n\
                  # HELP busy_seconds Time busy.\n# TYPE busy_seconds counter\n# UNIT busy_seconds seconds\nbusy_seconds_total 1.5\n\
                  # HELP depth Queue depth.\n# TYPE depth gauge\ndepth 7\n# EOF\n";
        assert_eq!(
            classic(om),
            "# HELP jobs_total Jobs done.\n# TYPE jobs_total counter\njobs_total{q=\"a\"} 3\n\
             # HELP busy_seconds_total Time busy.\n# TYPE busy_seconds_total counter\nbusy_seconds_total 1.5\n\
             # HELP depth Queue depth.\n# TYPE depth gauge\ndepth 7\n"
        );
    }
}
