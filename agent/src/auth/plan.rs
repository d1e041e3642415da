//! Which identity pairs the live policy needs proven: one [`PairPlan`] per distinct (from, to)
//! of the rules with `authentication: mtls`, with the SPIFFE IDs both ends must present, the
//! pair key the kernel looks proofs up by, and where each end's agent listens (file mode:
//! `authAddress`).

use std::{collections::HashMap, net::SocketAddr};

use crate::{
    identity::SpiffeId,
    policy::{auth_pair_key, Policy},
};

/// One end of a pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PairEnd {
    /// The identity's name in the policy.
    pub identity: String,
    pub spiffe_id: SpiffeId,
    /// The auth listener of the node hosting this identity, if the policy says.
    pub auth_address: Option<SocketAddr>,
}

/// A pair that rules require authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PairPlan {
    /// `TG_AUTH` key (`auth_pair_key(src, dst)`).
    pub key: u64,
    pub src: PairEnd,
    pub dst: PairEnd,
    /// The rules that need it, in policy order.
    pub rules: Vec<String>,
}

/// Every pair of the live policy that needs a proof.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuthPlan {
    pub pairs: Vec<PairPlan>,
}

impl AuthPlan {
    /// The pairs `policy` needs proven. Validation made sure both ends of an mtls rule are
    /// declared identities with a valid SPIFFE ID; a pair whose ID does not parse here (the
    /// validator and the SPIFFE parser disagree) is left out and logged, which leaves its flows
    /// refused, never allowed.
    pub fn of(policy: &Policy) -> AuthPlan {
        let ends: HashMap<&str, PairEnd> = policy
            .identities
            .iter()
            .filter_map(|i| {
                let text = i.spiffe_id.as_deref()?;
                match SpiffeId::parse(text) {
                    Ok(spiffe_id) => Some((
                        i.name.as_str(),
                        PairEnd {
                            identity: i.name.clone(),
                            spiffe_id,
                            auth_address: i.auth_address,
                        },
                    )),
                    Err(e) => {
                        tracing::warn!(identity = %i.name, error = %e, "SPIFFE ID not usable for authentication");
                        None
                    }
                }
            })
            .collect();
        let mut pairs: Vec<PairPlan> = Vec::new();
        let mut at: HashMap<(&str, &str), usize> = HashMap::new();
        for rule in policy.rules.iter().filter(|r| r.authentication.is_some()) {
            let (Some(src), Some(dst)) = (ends.get(rule.from.as_str()), ends.get(rule.to.as_str()))
            else {
                continue;
            };
            match at.get(&(rule.from.as_str(), rule.to.as_str())) {
                Some(&i) => pairs[i].rules.push(rule.name.clone()),
                None => {
                    at.insert((rule.from.as_str(), rule.to.as_str()), pairs.len());
                    pairs.push(PairPlan {
                        key: auth_pair_key(src.spiffe_id.as_str(), dst.spiffe_id.as_str()),
                        src: src.clone(),
                        dst: dst.clone(),
                        rules: vec![rule.name.clone()],
                    });
                }
            }
        }
        AuthPlan { pairs }
    }

    pub fn by_key(&self, key: u64) -> Option<&PairPlan> {
        self.pairs.iter().find(|p| p.key == key)
    }

    /// The pair between two identities, by name (as events name them).
    pub fn by_names(&self, src: &str, dst: &str) -> Option<&PairPlan> {
        self.pairs
            .iter()
            .find(|p| p.src.identity == src && p.dst.identity == dst)
    }

    /// The pair between two SPIFFE IDs.
    pub fn by_ids(&self, src: &SpiffeId, dst: &SpiffeId) -> Option<&PairPlan> {
        self.pairs
            .iter()
            .find(|p| &p.src.spiffe_id == src && &p.dst.spiffe_id == dst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::parse_policy;

    fn plan(rules: &str) -> AuthPlan {
        let text = format!(
            "apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {{ name: t }}
spec:
  identities:
    - {{ name: a, spiffeId: spiffe://t.test/a, authAddress: \"10.200.0.1:7443\", cidrs: [10.200.1.0/24] }}
    - {{ name: b, spiffeId: spiffe://t.test/b, cidrs: [10.200.2.0/24] }}
    - {{ name: c, cidrs: [10.200.3.0/24] }}
  rules:
{rules}"
        );
        AuthPlan::of(&parse_policy(&text, "t.yaml").unwrap_or_else(|e| panic!("{e}")))
    }

    #[test]
    fn one_pair_per_direction_with_every_rule_that_needs_it() {
        let p = plan(
            "    - { name: r1, from: a, to: b, ports: [{ protocol: TCP, port: 1 }], authentication: mtls }
    - { name: r2, from: a, to: b, ports: [{ protocol: TCP, port: 2 }], authentication: mtls }
    - { name: r3, from: b, to: a, ports: [{ protocol: TCP, port: 3 }], authentication: mtls }
    - { name: r4, from: a, to: c, ports: [{ protocol: TCP, port: 4 }] }
",
        );
        assert_eq!(p.pairs.len(), 2);
        let ab = p.by_names("a", "b").unwrap();
        assert_eq!(ab.rules, ["r1", "r2"]);
        assert_eq!(
            ab.key,
            auth_pair_key("spiffe://t.test/a", "spiffe://t.test/b")
        );
        assert_eq!(
            ab.src.auth_address,
            Some("10.200.0.1:7443".parse().unwrap())
        );
        assert_eq!(ab.dst.auth_address, None);
        let ba = p.by_names("b", "a").unwrap();
        assert_ne!(ba.key, ab.key);
        assert_eq!(p.by_key(ba.key), Some(ba));
        assert!(p.by_names("a", "c").is_none());
    }

    #[test]
    fn a_policy_without_mtls_rules_needs_nothing() {
        let p = plan("    - { name: r, from: a, to: b, ports: [{ protocol: TCP, port: 1 }] }\n");
        assert!(p.pairs.is_empty());
    }
}
