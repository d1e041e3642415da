//! The filters `bench --traffic` compares, as rule sets of N entries of which exactly one lets
//! the measured client→server flows through and the others never match them, and guards that
//! install one in the router namespace and remove it completely in Drop.
//!
//! All three kinds get the same rules: the non-matching ones connect pairs of 1000 other
//! addresses on TCP 8080, the allowing one connects the client to the server on the measured
//! ports. Tollgate and iptables count rules (the allowing rule lists the three ports, iptables
//! with `-m multiport`); the nftables set counts elements, one per measured port.

use std::{
    fmt::Write as _,
    net::IpAddr,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use tollgate_testbed::{AgentProcess, NetNs};

/// TCP ports of the three workloads: connection rate, request/response, iperf3.
pub const CONNECTION_PORT: u16 = 7001;
pub const REQUEST_RESPONSE_PORT: u16 = 7002;
pub const BULK_PORT: u16 = 5201;
pub const MEASURED_PORTS: [u16; 3] = [CONNECTION_PORT, REQUEST_RESPONSE_PORT, BULK_PORT];

/// The port of the non-matching rules.
const OTHER_PORT: u16 = 8080;

/// Addresses of the non-matching rules: enough for 100,000 distinct pairs.
const OTHER_IDENTITIES: usize = 1000;

/// nftables table the bench creates (and deletes) in the router namespace.
const NFT_TABLE: &str = "tollgate_bench";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn name(self) -> &'static str {
        match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        }
    }
}

/// The `i`-th address that no measured flow uses, in the testbed's ranges but outside its
/// workload subnets (10.200.1-15.0/24, fd00:200:1-f::/64).
pub fn other_address(i: usize, family: Family) -> IpAddr {
    match family {
        Family::V4 => IpAddr::from([10, 200, 16 + (i / 250) as u8, (i % 250 + 1) as u8]),
        Family::V6 => IpAddr::from([
            0xfd00,
            0x200,
            0x10,
            0,
            0,
            0,
            (i >> 16) as u16,
            (i & 0xffff) as u16 + 1,
        ]),
    }
}

/// The pair of other-identity indices of non-matching rule `k`: all distinct up to 1,000,000.
fn other_pair(k: usize) -> (usize, usize) {
    (
        k % OTHER_IDENTITIES,
        (k / OTHER_IDENTITIES) % OTHER_IDENTITIES,
    )
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum IptablesBackend {
    Nft,
    Legacy,
}

impl IptablesBackend {
    pub fn name(self) -> &'static str {
        match self {
            IptablesBackend::Nft => "iptables-nft",
            IptablesBackend::Legacy => "iptables-legacy",
        }
    }

    /// The tool for `family`: iptables-nft, ip6tables-legacy, ...
    pub fn tool(self, family: Family) -> String {
        let stem = match family {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        };
        let backend = match self {
            IptablesBackend::Nft => "nft",
            IptablesBackend::Legacy => "legacy",
        };
        format!("{stem}-{backend}")
    }

    pub fn restore_tool(self, family: Family) -> String {
        format!("{}-restore", self.tool(family))
    }
}

/// One configuration of the router.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Filter {
    None,
    Tollgate {
        rules: usize,
    },
    Iptables {
        backend: IptablesBackend,
        rules: usize,
    },
    Nftables {
        elements: usize,
    },
}

impl Filter {
    pub fn name(self) -> &'static str {
        match self {
            Filter::None => "no filter",
            Filter::Tollgate { .. } => "tollgate",
            Filter::Iptables { backend, .. } => backend.name(),
            Filter::Nftables { .. } => "nftables set",
        }
    }

    /// Rules (Tollgate, iptables) or set elements (nftables).
    pub fn size(self) -> Option<usize> {
        match self {
            Filter::None => None,
            Filter::Tollgate { rules } | Filter::Iptables { rules, .. } => Some(rules),
            Filter::Nftables { elements } => Some(elements),
        }
    }

    pub fn label(self) -> String {
        match self.size() {
            None => self.name().to_string(),
            Some(n) => format!("{} {}", self.name(), count(n)),
        }
    }
}

/// 10, 10k, 100k, 1.5k.
pub fn count(n: usize) -> String {
    if n >= 1000 && n.is_multiple_of(100) {
        if n.is_multiple_of(1000) {
            format!("{}k", n / 1000)
        } else {
            format!("{:.1}k", n as f64 / 1000.0)
        }
    } else {
        n.to_string()
    }
}

/// The workload addresses the rules are written for.
#[derive(Clone, Copy, Debug)]
pub struct Endpoints {
    pub client: IpAddr,
    pub server: IpAddr,
}

/// Tollgate policy: `rules` rules, the first lets client reach server on the measured ports.
/// The client and server identities are bound to their router-side veths, as pods' are. The
/// policy has the same identities (both address families) whatever the rule count, so only the
/// rule count changes between sizes.
pub fn tollgate_policy(rules: usize, v4: Endpoints, v6: Endpoints) -> String {
    let mut y = String::from(
        "apiVersion: tollgate.dev/v1alpha1\nkind: Policy\nmetadata: { name: traffic-bench }\nspec:\n  identities:\n",
    );
    let _ = writeln!(
        y,
        "    - {{ name: client, cidrs: [\"{}\", \"{}\"], interfaces: [\"tg-client\"] }}",
        host_cidr(v4.client),
        host_cidr(v6.client)
    );
    let _ = writeln!(
        y,
        "    - {{ name: server, cidrs: [\"{}\", \"{}\"], interfaces: [\"tg-server\"] }}",
        host_cidr(v4.server),
        host_cidr(v6.server)
    );
    for i in 0..OTHER_IDENTITIES {
        let _ = writeln!(
            y,
            "    - {{ name: id{i}, cidrs: [\"{}\", \"{}\"] }}",
            host_cidr(other_address(i, Family::V4)),
            host_cidr(other_address(i, Family::V6))
        );
    }
    let ports: Vec<String> = MEASURED_PORTS
        .iter()
        .map(|p| format!("{{ port: {p}, protocol: TCP }}"))
        .collect();
    let _ = writeln!(
        y,
        "  rules:\n    - {{ name: measured, from: client, to: server, ports: [{}] }}",
        ports.join(", ")
    );
    for k in 0..rules.saturating_sub(1) {
        let (src, dst) = other_pair(k);
        let _ = writeln!(
            y,
            "    - {{ name: r{k}, from: id{src}, to: id{dst}, ports: [{{ port: {OTHER_PORT}, protocol: TCP }}] }}"
        );
    }
    y
}

fn host_cidr(addr: IpAddr) -> String {
    match addr {
        IpAddr::V4(a) => format!("{a}/32"),
        IpAddr::V6(a) => format!("{a}/128"),
    }
}

/// `iptables-restore` input: FORWARD policy DROP, conntrack ESTABLISHED,RELATED first, then
/// `rules - 1` non-matching rules, the allowing rule last.
pub fn iptables_rules(rules: usize, family: Family, ends: Endpoints) -> String {
    let mut r = String::from(
        "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD DROP [0:0]\n:OUTPUT ACCEPT [0:0]\n\
         -A FORWARD -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT\n",
    );
    for k in 0..rules.saturating_sub(1) {
        let (src, dst) = other_pair(k);
        let _ = writeln!(
            r,
            "-A FORWARD -s {} -d {} -p tcp -m tcp --dport {OTHER_PORT} -j ACCEPT",
            host_cidr(other_address(src, family)),
            host_cidr(other_address(dst, family)),
        );
    }
    let ports: Vec<String> = MEASURED_PORTS.iter().map(u16::to_string).collect();
    let _ = writeln!(
        r,
        "-A FORWARD -s {} -d {} -p tcp -m multiport --dports {} -j ACCEPT\nCOMMIT",
        host_cidr(ends.client),
        host_cidr(ends.server),
        ports.join(",")
    );
    r
}

/// `nft -f` input: a forward chain with policy drop, `ct state established,related accept`,
/// then one lookup of (source, destination, destination port) in a set of `elements`
/// elements: the allowed pair's three ports and `elements - 3` that never match.
pub fn nftables_ruleset(elements: usize, family: Family, ends: Endpoints) -> String {
    let (table_family, addr_type, addr) = match family {
        Family::V4 => ("ip", "ipv4_addr", "ip"),
        Family::V6 => ("ip6", "ipv6_addr", "ip6"),
    };
    let mut items: Vec<String> = MEASURED_PORTS
        .iter()
        .map(|p| format!("{} . {} . {p}", ends.client, ends.server))
        .collect();
    for k in 0..elements.saturating_sub(MEASURED_PORTS.len()) {
        let (src, dst) = other_pair(k);
        items.push(format!(
            "{} . {} . {OTHER_PORT}",
            other_address(src, family),
            other_address(dst, family)
        ));
    }
    format!(
        "table {table_family} {NFT_TABLE} {{\n\
         \tset allowed {{\n\
         \t\ttype {addr_type} . {addr_type} . inet_service\n\
         \t\telements = {{\n\t\t\t{}\n\t\t}}\n\
         \t}}\n\
         \tchain forward {{\n\
         \t\ttype filter hook forward priority filter; policy drop;\n\
         \t\tct state established,related accept\n\
         \t\t{addr} saddr . {addr} daddr . tcp dport @allowed accept\n\
         \t}}\n\
         }}\n",
        items.join(",\n\t\t\t")
    )
}

/// What a filter needs to be installed: where its rule files are and what runs Tollgate.
pub struct FilterInputs<'a> {
    pub family: Family,
    pub workdir: &'a Path,
    pub tollgate: &'a Path,
}

impl FilterInputs<'_> {
    /// The rule file of `filter` in the work directory (written by `write_rule_file`).
    pub fn rule_file(&self, filter: Filter) -> Option<PathBuf> {
        let family = match self.family {
            Family::V4 => "v4",
            Family::V6 => "v6",
        };
        let name = match filter {
            Filter::None => return None,
            Filter::Tollgate { rules } => format!("policy-{rules}.yaml"),
            Filter::Iptables { rules, .. } => format!("iptables-{family}-{rules}.rules"),
            Filter::Nftables { elements } => format!("nftables-{family}-{elements}.nft"),
        };
        Some(self.workdir.join(name))
    }

    /// Writes the rule file of `filter` unless it exists (the iptables backends share one).
    pub fn write_rule_file(&self, filter: Filter, v4: Endpoints, v6: Endpoints) -> Result<()> {
        let Some(path) = self.rule_file(filter) else {
            return Ok(());
        };
        if path.exists() {
            return Ok(());
        }
        let ends = match self.family {
            Family::V4 => v4,
            Family::V6 => v6,
        };
        let text = match filter {
            Filter::None => return Ok(()),
            Filter::Tollgate { rules } => tollgate_policy(rules, v4, v6),
            Filter::Iptables { rules, .. } => iptables_rules(rules, self.family, ends),
            Filter::Nftables { elements } => nftables_ruleset(elements, self.family, ends),
        };
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))
    }
}

/// A filter installed in the router namespace; Drop removes it completely. The namespace
/// itself is deleted after this guard (and with it anything a legacy table leaves behind).
pub struct InstalledFilter {
    filter: Filter,
    family: Family,
    router: String,
    agent: Option<AgentProcess>,
    /// From the start of the install command until the filter is in force.
    pub load_time: Duration,
}

impl InstalledFilter {
    /// Installs `filter` in `router`, enforcing on `interfaces` (Tollgate). `bpffs` is a fresh
    /// pin directory for a Tollgate agent.
    pub fn install(
        filter: Filter,
        router: &NetNs,
        interfaces: &str,
        inputs: &FilterInputs,
        bpffs: &Path,
    ) -> Result<Self> {
        let start = Instant::now();
        let mut installed = InstalledFilter {
            filter,
            family: inputs.family,
            router: router.name().to_string(),
            agent: None,
            load_time: Duration::ZERO,
        };
        let rule_file = inputs.rule_file(filter);
        let rule_file = rule_file.as_deref().unwrap_or(Path::new(""));
        match filter {
            Filter::None => {}
            Filter::Tollgate { .. } => {
                let agent_dir = inputs
                    .workdir
                    .join(bpffs.file_name().context("bpffs directory has no name")?);
                installed.agent = Some(
                    AgentProcess::start(
                        inputs.tollgate,
                        router,
                        interfaces,
                        rule_file,
                        &agent_dir,
                        bpffs,
                    )
                    .context("starting the tollgate agent in the router namespace")?,
                );
            }
            Filter::Iptables { backend, .. } => {
                let tool = backend.restore_tool(inputs.family);
                run_in(router, &[tool.as_str(), &rule_file.to_string_lossy()])?;
            }
            Filter::Nftables { .. } => {
                run_in(router, &["nft", "-f", &rule_file.to_string_lossy()])?;
            }
        }
        installed.load_time = start.elapsed();
        Ok(installed)
    }

    /// The Tollgate agent enforcing this filter, if it is one: its pin directory holds the
    /// programs whose run-time statistics the bench reads.
    pub fn agent(&self) -> Option<&AgentProcess> {
        self.agent.as_ref()
    }

    fn remove(&mut self) -> Result<()> {
        match self.filter {
            Filter::None => Ok(()),
            // AgentProcess's Drop stops the agent by pid and uninstalls its pins.
            Filter::Tollgate { .. } => {
                drop(self.agent.take());
                Ok(())
            }
            Filter::Iptables { backend, .. } => {
                let tool = backend.tool(self.family);
                self.exec(&[&tool, "-P", "FORWARD", "ACCEPT"])?;
                self.exec(&[&tool, "-F", "FORWARD"])?;
                // iptables-nft keeps its (now empty) `filter` table and base chains hooked;
                // deleting the table unhooks them. A legacy table stays registered until the
                // namespace goes, which is right after this.
                if backend == IptablesBackend::Nft {
                    let family = match self.family {
                        Family::V4 => "ip",
                        Family::V6 => "ip6",
                    };
                    self.exec(&["nft", "delete", "table", family, "filter"])?;
                }
                Ok(())
            }
            Filter::Nftables { .. } => {
                let family = match self.family {
                    Family::V4 => "ip",
                    Family::V6 => "ip6",
                };
                self.exec(&["nft", "delete", "table", family, NFT_TABLE])
            }
        }
    }

    fn exec(&self, args: &[&str]) -> Result<()> {
        tollgate_testbed::netns::run_checked(
            Command::new("ip")
                .args(["netns", "exec", &self.router])
                .args(args),
        )
    }
}

impl Drop for InstalledFilter {
    fn drop(&mut self) {
        if let Err(e) = self.remove() {
            eprintln!(
                "warning: removing {} from {}: {e:#}",
                self.filter.label(),
                self.router
            );
        }
    }
}

fn run_in(ns: &NetNs, args: &[&str]) -> Result<()> {
    ns.exec_checked(args)
        .with_context(|| format!("installing the filter with {}", args[0]))
}

/// The path of tool `name`, or an error saying which Debian package provides it.
pub fn require_tool(name: &str, package: &str) -> Result<PathBuf> {
    find_program(name).with_context(|| {
        format!(
            "{name} not found in PATH; `cargo xtask setup` (as root) installs the Debian package {package}"
        )
    })
}

/// `name` in PATH (or the sbin directories, which a non-login root shell may lack).
pub fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| {
            use std::os::unix::fs::PermissionsExt as _;
            p.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// Fails if `filter` cannot be measured for lack of a tool; checked before the first round
/// rather than in the middle of one.
pub fn check_tools(filter: Filter, family: Family) -> Result<()> {
    match filter {
        Filter::None | Filter::Tollgate { .. } => Ok(()),
        Filter::Iptables { backend, .. } => {
            require_tool(&backend.restore_tool(family), "iptables").map(drop)
        }
        Filter::Nftables { .. } => require_tool("nft", "nftables").map(drop),
    }
}

/// Parses a rule count: `10`, `10000`, `10k`, `100k`.
pub fn parse_count(s: &str) -> Result<usize> {
    let (digits, scale) = match s.strip_suffix(['k', 'K']) {
        Some(d) => (d, 1000),
        None => (s, 1),
    };
    let n: usize = digits
        .parse()
        .with_context(|| format!("{s:?} is not a rule count (e.g. 10, 10000, 10k)"))?;
    if n == 0 {
        bail!("a rule count must be at least 1");
    }
    Ok(n * scale)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ends_v4() -> Endpoints {
        Endpoints {
            client: "10.200.1.2".parse().unwrap(),
            server: "10.200.2.2".parse().unwrap(),
        }
    }

    fn ends_v6() -> Endpoints {
        Endpoints {
            client: "fd00:200:1::2".parse().unwrap(),
            server: "fd00:200:2::2".parse().unwrap(),
        }
    }

    #[test]
    fn other_addresses_are_distinct_and_outside_the_workload_subnets() {
        let mut seen = std::collections::HashSet::new();
        for i in 0..OTHER_IDENTITIES {
            for family in [Family::V4, Family::V6] {
                let a = other_address(i, family);
                assert!(seen.insert(a), "{a} twice");
                match a {
                    IpAddr::V4(a) => assert!(a.octets()[2] >= 16, "{a}"),
                    IpAddr::V6(a) => assert_eq!(a.segments()[2], 0x10, "{a}"),
                }
            }
        }
    }

    #[test]
    fn iptables_chain_has_conntrack_first_and_the_allow_rule_last() {
        let text = iptables_rules(10, Family::V4, ends_v4());
        let rules: Vec<&str> = text.lines().filter(|l| l.starts_with("-A")).collect();
        assert_eq!(rules.len(), 11, "conntrack + 10 rules");
        assert!(rules[0].contains("--ctstate ESTABLISHED,RELATED"));
        assert!(rules[10].contains("-s 10.200.1.2/32 -d 10.200.2.2/32"));
        assert!(rules[10].contains("--dports 7001,7002,5201"));
        assert!(rules[1..10].iter().all(|r| !r.contains("10.200.1.2")));
        assert!(text.contains(":FORWARD DROP"));
        assert!(text.ends_with("COMMIT\n"));
    }

    #[test]
    fn ip6tables_rules_use_ipv6_addresses() {
        let text = iptables_rules(3, Family::V6, ends_v6());
        assert!(text.contains("-s fd00:200:1::2/128 -d fd00:200:2::2/128"));
        assert!(text.contains("-s fd00:200:10::1/128"));
    }

    #[test]
    fn nftables_set_has_exactly_n_elements_including_the_three_allowed() {
        let text = nftables_ruleset(10, Family::V4, ends_v4());
        let elements = text.lines().filter(|l| l.starts_with("\t\t\t")).count();
        assert_eq!(elements, 10);
        assert!(text.contains("10.200.1.2 . 10.200.2.2 . 5201"));
        assert!(text.contains("ct state established,related accept"));
        assert!(text.contains("policy drop"));
    }

    #[test]
    fn tollgate_policy_has_n_rules_with_the_measured_one_first() {
        let text = tollgate_policy(10, ends_v4(), ends_v6());
        let rules: Vec<&str> = text.lines().filter(|l| l.contains("from:")).collect();
        assert_eq!(rules.len(), 10);
        assert!(rules[0].contains("from: client, to: server"));
        assert!(rules[0].contains("port: 5201"));
        assert!(text.contains("interfaces: [\"tg-client\"]"));
    }

    #[test]
    fn non_matching_rules_are_distinct_pairs_up_to_100k() {
        let pairs: std::collections::HashSet<_> = (0..100_000).map(other_pair).collect();
        assert_eq!(pairs.len(), 100_000);
    }

    #[test]
    fn counts_parse_and_print_in_k() {
        assert_eq!(parse_count("10").unwrap(), 10);
        assert_eq!(parse_count("10k").unwrap(), 10_000);
        assert_eq!(parse_count("100000").unwrap(), 100_000);
        assert!(parse_count("0").is_err());
        assert!(parse_count("ten").is_err());
        assert_eq!(count(10), "10");
        assert_eq!(count(10_000), "10k");
        assert_eq!(count(1_500), "1.5k");
    }
}
