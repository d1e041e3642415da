//! Identity selectors (Kubernetes mode): which pods an identity's `selector` takes in, with the
//! semantics of Kubernetes label selectors, and when two selectors certainly share pods.
//!
//! A selector matches a pod when every part it sets matches: `namespace` (the pod's namespace
//! by name) or `namespaceSelector` (the labels of the pod's Namespace object), `matchLabels`
//! and `matchExpressions` (the pod's labels), and `serviceAccount` (`spec.serviceAccountName`).
//! Which pods are candidates at all (running, not host-network) is the caller's business.

use std::collections::{BTreeMap, BTreeSet};

/// Labels of a pod or a namespace.
pub type Labels = BTreeMap<String, String>;

/// A validated `selector`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selector {
    pub namespace: NamespaceMatch,
    /// `matchLabels` and `matchExpressions` on the pod's labels.
    pub pods: LabelSelector,
    /// The pod's `spec.serviceAccountName`.
    pub service_account: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NamespaceMatch {
    /// Neither `namespace` nor `namespaceSelector`: pods of every namespace.
    Any,
    /// `namespace`.
    Named(String),
    /// `namespaceSelector`, on the labels of the pod's Namespace.
    Labels(LabelSelector),
}

/// `matchLabels` and `matchExpressions` together: every requirement must hold. `matchLabels`
/// `k: v` is the requirement `k In (v)`. An empty selector matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabelSelector {
    pub requirements: Vec<Requirement>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Requirement {
    pub key: String,
    pub op: Op,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    In(BTreeSet<String>),
    NotIn(BTreeSet<String>),
    Exists,
    DoesNotExist,
}

/// What a selector looks at of one pod.
#[derive(Debug, Clone, Copy)]
pub struct PodView<'a> {
    pub namespace: &'a str,
    pub labels: &'a Labels,
    pub service_account: &'a str,
    /// The labels of the pod's Namespace; `None` while the Namespace is not known (a
    /// `namespaceSelector` then matches nothing: unknown is never a match).
    pub namespace_labels: Option<&'a Labels>,
}

impl Requirement {
    pub fn matches(&self, labels: &Labels) -> bool {
        let value = labels.get(&self.key);
        match &self.op {
            Op::In(values) => value.is_some_and(|v| values.contains(v)),
            // As Kubernetes: a pod without the key satisfies `NotIn`.
            Op::NotIn(values) => value.is_none_or(|v| !values.contains(v)),
            Op::Exists => value.is_some(),
            Op::DoesNotExist => value.is_none(),
        }
    }

    /// Whether every label set satisfying `self` also satisfies `other` (same key only).
    fn implies(&self, other: &Requirement) -> bool {
        if self.key != other.key {
            return false;
        }
        match (&self.op, &other.op) {
            (Op::In(a), Op::In(b)) => a.is_subset(b),
            (Op::In(_) | Op::Exists, Op::Exists) => true,
            (Op::In(a), Op::NotIn(b)) => a.is_disjoint(b),
            (Op::NotIn(a), Op::NotIn(b)) => b.is_subset(a),
            (Op::DoesNotExist, Op::NotIn(_) | Op::DoesNotExist) => true,
            _ => false,
        }
    }
}

impl LabelSelector {
    pub fn matches(&self, labels: &Labels) -> bool {
        self.requirements.iter().all(|r| r.matches(labels))
    }

    /// Whether every label set `narrower` matches is matched by `self` too. Sound but not
    /// complete: `true` is certain, `false` may be a superset this check cannot see.
    pub fn covers(&self, narrower: &LabelSelector) -> bool {
        self.requirements
            .iter()
            .all(|r| narrower.requirements.iter().any(|n| n.implies(r)))
    }
}

impl Selector {
    pub fn matches(&self, pod: &PodView<'_>) -> bool {
        let namespace = match &self.namespace {
            NamespaceMatch::Any => true,
            NamespaceMatch::Named(name) => name == pod.namespace,
            NamespaceMatch::Labels(selector) => {
                pod.namespace_labels.is_some_and(|l| selector.matches(l))
            }
        };
        namespace
            && self
                .service_account
                .as_ref()
                .is_none_or(|sa| sa == pod.service_account)
            && self.pods.matches(pod.labels)
    }

    /// Whether every pod `narrower` matches is certainly matched by `self` as well, whatever
    /// pods and namespaces exist. Then no pod could ever belong to `narrower` alone, and two
    /// identities with such selectors are refused at apply time.
    pub fn covers(&self, narrower: &Selector) -> bool {
        let namespace = match (&self.namespace, &narrower.namespace) {
            (NamespaceMatch::Any, _) => true,
            (NamespaceMatch::Named(a), NamespaceMatch::Named(b)) => a == b,
            (NamespaceMatch::Labels(a), NamespaceMatch::Labels(b)) => a.covers(b),
            _ => false,
        };
        let service_account = match (&self.service_account, &narrower.service_account) {
            (None, _) => true,
            (Some(a), Some(b)) => a == b,
            (Some(_), None) => false,
        };
        namespace && service_account && self.pods.covers(&narrower.pods)
    }

    /// Whether the selector reads namespace labels (a Namespace's labels changing can move its
    /// pods).
    pub fn reads_namespace_labels(&self) -> bool {
        matches!(self.namespace, NamespaceMatch::Labels(_))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn req(key: &str, op: Op) -> Requirement {
        Requirement {
            key: key.to_owned(),
            op,
        }
    }

    fn set(values: &[&str]) -> BTreeSet<String> {
        values.iter().map(|v| v.to_string()).collect()
    }

    fn sel(namespace: NamespaceMatch, reqs: Vec<Requirement>, sa: Option<&str>) -> Selector {
        Selector {
            namespace,
            pods: LabelSelector { requirements: reqs },
            service_account: sa.map(str::to_owned),
        }
    }

    #[test]
    fn requirements_match_as_kubernetes_does() {
        let l = labels(&[("app", "web"), ("tier", "front")]);
        assert!(req("app", Op::In(set(&["web", "api"]))).matches(&l));
        assert!(!req("app", Op::In(set(&["api"]))).matches(&l));
        assert!(!req("missing", Op::In(set(&["x"]))).matches(&l));
        assert!(req("app", Op::NotIn(set(&["api"]))).matches(&l));
        assert!(!req("app", Op::NotIn(set(&["web"]))).matches(&l));
        // A missing key satisfies NotIn, as in Kubernetes.
        assert!(req("missing", Op::NotIn(set(&["x"]))).matches(&l));
        assert!(req("tier", Op::Exists).matches(&l));
        assert!(!req("missing", Op::Exists).matches(&l));
        assert!(req("missing", Op::DoesNotExist).matches(&l));
        assert!(!req("tier", Op::DoesNotExist).matches(&l));
        assert!(LabelSelector::default().matches(&l));
    }

    #[test]
    fn selectors_match_namespace_labels_and_service_account() {
        let pod_labels = labels(&[("app", "pay")]);
        let ns_labels = labels(&[("team", "a")]);
        let pod = PodView {
            namespace: "shop",
            labels: &pod_labels,
            service_account: "payments",
            namespace_labels: Some(&ns_labels),
        };
        let app = || vec![req("app", Op::In(set(&["pay"])))];
        assert!(sel(
            NamespaceMatch::Named("shop".into()),
            app(),
            Some("payments")
        )
        .matches(&pod));
        assert!(!sel(NamespaceMatch::Named("other".into()), app(), None).matches(&pod));
        assert!(!sel(NamespaceMatch::Any, app(), Some("default")).matches(&pod));
        let by_team = NamespaceMatch::Labels(LabelSelector {
            requirements: vec![req("team", Op::In(set(&["a"])))],
        });
        assert!(sel(by_team.clone(), app(), None).matches(&pod));
        // Namespace labels not known yet: a namespaceSelector matches nothing.
        let unknown = PodView {
            namespace_labels: None,
            ..pod
        };
        assert!(!sel(by_team, app(), None).matches(&unknown));
        assert!(sel(NamespaceMatch::Any, app(), None).matches(&unknown));
    }

    #[test]
    fn covers_is_certain_containment() {
        let shop = || NamespaceMatch::Named("shop".into());
        let whole_ns = sel(shop(), vec![], None);
        let app = sel(shop(), vec![req("app", Op::In(set(&["pay"])))], None);
        assert!(whole_ns.covers(&app));
        assert!(!app.covers(&whole_ns));
        assert!(app.covers(&app.clone()));
        // Different namespaces never share pods.
        let other = sel(
            NamespaceMatch::Named("other".into()),
            vec![req("app", Op::In(set(&["pay"])))],
            None,
        );
        assert!(!app.covers(&other) && !other.covers(&app));
        // Different labels: a pod could carry both, but nothing makes it certain.
        let tier = sel(shop(), vec![req("tier", Op::In(set(&["web"])))], None);
        assert!(!app.covers(&tier) && !tier.covers(&app));
        // In ⊂ In, In vs NotIn disjoint, Exists.
        let one = sel(shop(), vec![req("app", Op::In(set(&["a"])))], None);
        let two = sel(shop(), vec![req("app", Op::In(set(&["a", "b"])))], None);
        assert!(two.covers(&one) && !one.covers(&two));
        let not_b = sel(shop(), vec![req("app", Op::NotIn(set(&["b"])))], None);
        assert!(not_b.covers(&one));
        let exists = sel(shop(), vec![req("app", Op::Exists)], None);
        assert!(exists.covers(&one) && !one.covers(&exists));
        let absent = sel(shop(), vec![req("app", Op::DoesNotExist)], None);
        assert!(not_b.covers(&absent) && !exists.covers(&absent));
        // A service account narrows; Any namespace covers a named one.
        let sa = sel(shop(), vec![], Some("payments"));
        assert!(whole_ns.covers(&sa) && !sa.covers(&whole_ns));
        assert!(sel(NamespaceMatch::Any, vec![], Some("payments")).covers(&sa));
        // A namespace selector cannot be compared with a namespace name statically.
        let labelled = sel(
            NamespaceMatch::Labels(LabelSelector {
                requirements: vec![req("team", Op::Exists)],
            }),
            vec![],
            None,
        );
        assert!(!labelled.covers(&whole_ns) && !whole_ns.covers(&labelled));
    }
}
