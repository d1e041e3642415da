//! What `bench --traffic` measured, summarised: per workload and configuration the median of
//! the rounds and the median of the per-round ratios to "no filter" (each ratio taken against
//! the baseline of its own round, so slow drifts of the machine cancel), the targets of issue
//! 6, the filters' load times and the per-hook cost of Tollgate's programs.

use std::{fmt::Write as _, time::Duration};

use super::{filter::Filter, hook_stats::ProgramCounters};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Workload {
    NewConnections,
    RequestResponse,
    Bulk,
}

impl Workload {
    pub const ALL: [Workload; 3] = [
        Workload::NewConnections,
        Workload::RequestResponse,
        Workload::Bulk,
    ];

    pub fn index(self) -> usize {
        self as usize
    }

    pub fn short(self) -> &'static str {
        match self {
            Workload::NewConnections => "new connections",
            Workload::RequestResponse => "request/response",
            Workload::Bulk => "bulk TCP",
        }
    }

    /// Lowest acceptable ratio to no filter (issue 6).
    pub fn target(self) -> f64 {
        match self {
            Workload::NewConnections | Workload::RequestResponse => 0.95,
            Workload::Bulk => 0.98,
        }
    }

    pub fn format(self, value: f64) -> String {
        match self {
            Workload::NewConnections | Workload::RequestResponse => {
                format!("{}/s", thousands(value.round() as u64))
            }
            Workload::Bulk => format!("{:.2} Gbit/s", value / 1e9),
        }
    }
}

/// 12345 → "12,345".
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// One configuration measured in one round.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Sample {
    /// Indexed by `Workload::index`: connections/s, transactions/s, bits/s.
    pub values: [f64; 3],
    /// Connection attempts that failed or timed out during the connection-rate workload.
    pub failed_connections: u64,
    pub load_time: Duration,
}

/// Run-time statistics of Tollgate's programs during one workload, one entry per round.
#[derive(Clone, Debug)]
pub struct HookCost {
    pub rules: usize,
    pub workload: Workload,
    /// Program name (its pin name) and its counters accumulated during the workload, by round.
    pub programs: Vec<(String, Vec<ProgramCounters>)>,
}

/// Everything measured. `filters[0]` is `Filter::None`; for every other configuration `c`,
/// `samples[c][r]` was measured in round `r` back to back with the no-filter run
/// `baselines[c][r]`. `samples[0]` collects every no-filter run.
pub struct Results {
    pub filters: Vec<Filter>,
    pub samples: Vec<Vec<Sample>>,
    pub baselines: Vec<Vec<Sample>>,
    pub hook_costs: Vec<HookCost>,
}

/// Median of a set; the mean of the middle two for an even count, NaN for none.
pub fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// One cell of a workload table.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Summary {
    pub median: f64,
    pub ratio: f64,
    pub ratio_min: f64,
    pub ratio_max: f64,
}

impl Results {
    pub fn new(filters: Vec<Filter>) -> Self {
        let n = filters.len();
        Self {
            filters,
            samples: vec![Vec::new(); n],
            baselines: vec![Vec::new(); n],
            hook_costs: Vec::new(),
        }
    }

    /// Records configuration `c` and the no-filter run it was paired with.
    pub fn add_pair(&mut self, c: usize, baseline: Sample, sample: Sample) {
        self.samples[0].push(baseline);
        self.baselines[c].push(baseline);
        self.samples[c].push(sample);
    }

    pub fn add_hook_costs(
        &mut self,
        rules: usize,
        workload: Workload,
        programs: Vec<(String, ProgramCounters)>,
    ) {
        let entry = match self
            .hook_costs
            .iter_mut()
            .position(|h| h.rules == rules && h.workload == workload)
        {
            Some(i) => &mut self.hook_costs[i],
            None => {
                self.hook_costs.push(HookCost {
                    rules,
                    workload,
                    programs: Vec::new(),
                });
                self.hook_costs.last_mut().expect("just pushed")
            }
        };
        for (name, counters) in programs {
            match entry.programs.iter_mut().find(|(n, _)| *n == name) {
                Some((_, rounds)) => rounds.push(counters),
                None => entry.programs.push((name, vec![counters])),
            }
        }
    }

    pub fn summary(&self, config: usize, workload: Workload) -> Summary {
        let i = workload.index();
        let values: Vec<f64> = self.samples[config].iter().map(|s| s.values[i]).collect();
        let ratios: Vec<f64> = if config == 0 {
            vec![1.0]
        } else {
            self.samples[config]
                .iter()
                .zip(&self.baselines[config])
                .map(|(s, base)| s.values[i] / base.values[i])
                .collect()
        };
        Summary {
            median: median(&values),
            ratio: median(&ratios),
            ratio_min: ratios.iter().copied().fold(f64::INFINITY, f64::min),
            ratio_max: ratios.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        }
    }

    /// The tables, as printed to stdout.
    pub fn render(&self, workload_note: &dyn Fn(Workload) -> String) -> String {
        let mut out = String::new();
        for workload in Workload::ALL {
            let _ = writeln!(
                out,
                "\n{} ({}); target: >= {:.2} of no filter",
                workload.short(),
                workload_note(workload),
                workload.target()
            );
            let _ = writeln!(
                out,
                "  {:<22} {:>16} {:>7} {:>13}  target",
                "configuration", "median", "ratio", "ratio range"
            );
            for (c, filter) in self.filters.iter().enumerate() {
                let s = self.summary(c, workload);
                if c == 0 {
                    // The spread of the no-filter runs shows how noisy the machine was.
                    let values: Vec<f64> = self.samples[0]
                        .iter()
                        .map(|x| x.values[workload.index()])
                        .collect();
                    let lo = values.iter().copied().fold(f64::INFINITY, f64::min);
                    let hi = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    let _ = writeln!(
                        out,
                        "  {:<22} {:>16} {:>7.3} {:>13}  (spread of its {} runs / median)",
                        filter.label(),
                        workload.format(s.median),
                        1.0,
                        format!("{:.3}-{:.3}", lo / s.median, hi / s.median),
                        values.len()
                    );
                    continue;
                }
                let _ = writeln!(
                    out,
                    "  {:<22} {:>16} {:>7.3} {:>13}  {}",
                    filter.label(),
                    workload.format(s.median),
                    s.ratio,
                    format!("{:.3}-{:.3}", s.ratio_min, s.ratio_max),
                    if s.ratio >= workload.target() {
                        "met"
                    } else {
                        "MISSED"
                    }
                );
            }
        }

        let _ = writeln!(
            out,
            "\nfilter load time (median; Tollgate: agent start until it answers `status`)"
        );
        for (c, filter) in self.filters.iter().enumerate().skip(1) {
            let loads: Vec<f64> = self.samples[c]
                .iter()
                .map(|s| s.load_time.as_secs_f64())
                .collect();
            let failed: u64 = self.samples[c].iter().map(|s| s.failed_connections).sum();
            let _ = write!(out, "  {:<22} {:>8.2} s", filter.label(), median(&loads));
            if failed > 0 {
                let _ = write!(out, "   ({failed} connection attempts failed or timed out)");
            }
            out.push('\n');
        }
        let baseline_failed: u64 = self.samples[0].iter().map(|s| s.failed_connections).sum();
        if baseline_failed > 0 {
            let _ = writeln!(
                out,
                "  (no filter: {baseline_failed} connection attempts failed or timed out)"
            );
        }

        if !self.hook_costs.is_empty() {
            self.render_hook_costs(&mut out);
        }
        self.render_targets(&mut out);
        out
    }

    fn render_hook_costs(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "\nTollgate real-traffic cost per hook (BPF run-time statistics, on only while each \
             workload ran, in a pass of its own each round so the ratios above carry no \
             statistics overhead): median over the rounds of ns per program run (median runs \
             per workload); a program serves its hook on both veths"
        );
        let names: Vec<&str> = self.hook_costs[0]
            .programs
            .iter()
            .map(|(name, _)| name.as_str())
            .collect();
        let _ = write!(out, "  {:<7} {:<17}", "rules", "workload");
        for name in &names {
            let _ = write!(out, " {name:>28}");
        }
        out.push('\n');
        for cost in &self.hook_costs {
            let _ = write!(
                out,
                "  {:<7} {:<17}",
                super::filter::count(cost.rules),
                cost.workload.short()
            );
            for (_, rounds) in &cost.programs {
                let per_run: Vec<f64> = rounds.iter().filter_map(|c| c.ns_per_run()).collect();
                let runs: Vec<f64> = rounds.iter().map(|c| c.run_cnt as f64).collect();
                let cell = if per_run.is_empty() {
                    "not run".to_string()
                } else {
                    format!(
                        "{:.0} ns ({})",
                        median(&per_run),
                        thousands(median(&runs) as u64)
                    )
                };
                let _ = write!(out, " {cell:>28}");
            }
            out.push('\n');
        }
    }

    fn render_targets(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "\ntargets (issue 6): Tollgate >= 0.95 of no filter for new connections and \
             request/response, >= 0.98 for bulk, at every rule count"
        );
        for (c, filter) in self.filters.iter().enumerate() {
            let Filter::Tollgate { .. } = filter else {
                continue;
            };
            let cells: Vec<String> = Workload::ALL
                .iter()
                .map(|&w| {
                    let ratio = self.summary(c, w).ratio;
                    format!(
                        "{} {ratio:.3} {}",
                        w.short(),
                        if ratio >= w.target() { "met" } else { "MISSED" }
                    )
                })
                .collect();
            let _ = writeln!(out, "  {:<22} {}", filter.label(), cells.join(", "));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::traffic_bench::filter::IptablesBackend;

    fn sample(conn: f64, rr: f64, bulk: f64) -> Sample {
        Sample {
            values: [conn, rr, bulk],
            failed_connections: 0,
            load_time: Duration::from_millis(100),
        }
    }

    fn results() -> Results {
        let mut r = Results::new(vec![
            Filter::None,
            Filter::Tollgate { rules: 10 },
            Filter::Iptables {
                backend: IptablesBackend::Legacy,
                rules: 10_000,
            },
        ]);
        // Round 2's baseline is twice as fast.
        let base = [
            sample(1000.0, 100.0, 10e9),
            sample(2000.0, 100.0, 10e9),
            sample(1000.0, 100.0, 10e9),
        ];
        let tollgate = [
            sample(960.0, 90.0, 10e9),
            sample(1980.0, 99.0, 9.9e9),
            sample(900.0, 95.0, 9.7e9),
        ];
        let legacy = [
            sample(500.0, 100.0, 10e9),
            sample(1000.0, 100.0, 10e9),
            sample(500.0, 100.0, 10e9),
        ];
        for round in 0..3 {
            r.add_pair(1, base[round], tollgate[round]);
            r.add_pair(2, base[round], legacy[round]);
        }
        r
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
    }

    #[test]
    fn ratios_are_taken_against_the_baseline_of_the_same_round() {
        // Round 2's baseline is twice as fast; per-round ratios are 0.96, 0.99, 0.90.
        let s = results().summary(1, Workload::NewConnections);
        assert_eq!(s.median, 960.0);
        assert!((s.ratio - 0.96).abs() < 1e-9, "{s:?}");
        assert!((s.ratio_min - 0.90).abs() < 1e-9);
        assert!((s.ratio_max - 0.99).abs() < 1e-9);
    }

    #[test]
    fn the_table_marks_targets_met_and_missed() {
        let text = results().render(&|_| "test".to_string());
        let line = |prefix: &str, after: &str| {
            text.split(after)
                .nth(1)
                .unwrap()
                .lines()
                .find(|l| l.trim_start().starts_with(prefix))
                .unwrap()
                .to_string()
        };
        let conn = line("tollgate 10", "new connections (test)");
        assert!(conn.contains("0.960") && conn.ends_with("met"), "{conn}");
        let rr = line("tollgate 10", "request/response (test)");
        assert!(rr.contains("0.950") && rr.ends_with("met"), "{rr}");
        let bulk = line("tollgate 10", "bulk TCP (test)");
        assert!(bulk.contains("0.990") && bulk.ends_with("met"), "{bulk}");
        let legacy = line("iptables-legacy 10k", "new connections (test)");
        assert!(
            legacy.contains("0.500") && legacy.ends_with("MISSED"),
            "{legacy}"
        );
        assert!(text.contains("1,000/s"), "{text}");
    }

    #[test]
    fn the_baseline_row_is_the_median_of_every_no_filter_run() {
        let r = results();
        assert_eq!(r.samples[0].len(), 6);
        assert_eq!(r.summary(0, Workload::NewConnections).median, 1000.0);
    }

    #[test]
    fn hook_costs_are_collected_per_rules_and_workload_across_rounds() {
        let mut r = results();
        let counters = |ns, runs| ProgramCounters {
            run_time_ns: ns,
            run_cnt: runs,
        };
        for round in 1..=3 {
            r.add_hook_costs(
                10,
                Workload::Bulk,
                vec![
                    ("tollgate_ingress".into(), counters(round * 1000, 10)),
                    ("tollgate_egress".into(), counters(500, 10)),
                ],
            );
        }
        assert_eq!(r.hook_costs.len(), 1);
        assert_eq!(r.hook_costs[0].programs[0].1.len(), 3);
        let text = r.render(&|_| "test".to_string());
        let row = text.lines().find(|l| l.contains("bulk TCP  ")).unwrap();
        assert!(
            row.contains("200 ns (10)") && row.contains("50 ns (10)"),
            "{row}"
        );
    }

    #[test]
    fn thousands_are_grouped() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(1234567), "1,234,567");
    }
}
