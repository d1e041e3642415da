//! The names behind a generation's numbers, kept for the generations whose events may still be
//! on their way: an event is named as the generation that produced it numbered things.

use std::{
    collections::VecDeque,
    sync::Arc,
    time::{Duration, Instant},
};

use tollgate_common::{FlowEvent, Verdict};

use crate::policy::PolicyNames;

/// Generations whose names are kept for the events they may still have in the ring buffer.
/// Events are read within milliseconds of being written; eight swaps back is far beyond that.
const NAMED_GENERATIONS: usize = 8;
/// How long the names of a replaced generation are kept, for the same reason. A 100k-rule
/// generation's names take 6 MB: eight of them kept for good would be most of the agent's
/// memory.
const NAMES_KEPT_AFTER_REPLACED: Duration = Duration::from_secs(60);

/// Names of the live generation and of the ones before it, newest first, so an event is named
/// as the generation that produced it numbered things. At most [`NAMED_GENERATIONS`] are kept,
/// a replaced one for [`NAMES_KEPT_AFTER_REPLACED`]; a generation whose names equal those of
/// the one it replaced (the same policy applied again) shares them.
#[derive(Clone)]
pub struct NamedGenerations(VecDeque<NamedGeneration>);

#[derive(Clone)]
struct NamedGeneration {
    generation: u64,
    names: Arc<PolicyNames>,
    /// When the next generation went live.
    replaced: Option<Instant>,
}

impl NamedGenerations {
    pub fn new(generation: u64, names: Arc<PolicyNames>) -> Self {
        Self(VecDeque::from([NamedGeneration {
            generation,
            names,
            replaced: None,
        }]))
    }

    pub fn live(&self) -> &PolicyNames {
        &self
            .0
            .front()
            .expect("a policy is installed at start")
            .names
    }

    pub fn of(&self, generation: u64) -> Option<&PolicyNames> {
        self.0
            .iter()
            .find(|g| g.generation == generation)
            .map(|g| g.names.as_ref())
    }

    /// `generation` went live, replacing the live one.
    pub fn push(&mut self, generation: u64, names: Arc<PolicyNames>, now: Instant) {
        let names = match self.0.front_mut() {
            Some(live) => {
                live.replaced = Some(now);
                let same = live.names.rule_names == names.rule_names
                    && live.names.identity_names == names.identity_names
                    && live.names.bindings == names.bindings;
                if same {
                    Arc::clone(&live.names)
                } else {
                    names
                }
            }
            None => names,
        };
        self.0.push_front(NamedGeneration {
            generation,
            names,
            replaced: None,
        });
        self.0.truncate(NAMED_GENERATIONS);
        self.forget_expired(now);
    }

    /// Forgets generations replaced more than [`NAMES_KEPT_AFTER_REPLACED`] before `now`;
    /// tells whether there were any.
    pub fn forget_expired(&mut self, now: Instant) -> bool {
        let before = self.0.len();
        self.0.retain(|g| {
            g.replaced
                .is_none_or(|at| now.saturating_duration_since(at) < NAMES_KEPT_AFTER_REPLACED)
        });
        self.0.len() != before
    }
}

/// (source identity, destination identity, rule) of an event, named as the generation that
/// produced it numbered them. An event of a generation this agent does not know (written before
/// it started, or more than `NAMED_GENERATIONS` swaps ago) says so instead of borrowing another
/// generation's names.
pub fn name_event(names: Option<&PolicyNames>, ev: &FlowEvent) -> (String, String, String) {
    let identity = |id: u32| match (id, names) {
        (tollgate_common::flow::EVENT_IDENTITY_UNRESOLVED, _) => "unresolved".to_owned(),
        (_, Some(n)) => n.identity_name(id).to_owned(),
        (_, None) => format!("identity #{id}"),
    };
    let rule = match (ev.verdict, names) {
        (v, _) if v == Verdict::DropSpoofed as u32 => "source validation".to_owned(),
        (_, Some(n)) => n.rule_name(ev.rule_id).to_owned(),
        (_, None) if ev.rule_id == tollgate_common::rule::RULE_ID_NONE => "default-deny".to_owned(),
        (_, None) => format!("rule #{}", ev.rule_id),
    };
    let (from, to, mut rule) = (identity(ev.src_identity), identity(ev.dst_identity), rule);
    if names.is_none() {
        rule.push_str(&format!(
            " (generation {}, not known to this agent: names unavailable)",
            ev.generation
        ));
    }
    (from, to, rule)
}

#[cfg(test)]
mod tests {
    use tollgate_common::flow::EVENT_IDENTITY_UNRESOLVED;

    use super::*;

    fn names() -> PolicyNames {
        PolicyNames {
            rule_names: vec!["frontend-to-orders".into()],
            identity_names: vec![(256, "frontend".into()), (257, "orders".into())],
            bindings: Vec::new(),
        }
    }

    fn event(verdict: Verdict, src: u32, dst: u32, rule: u32) -> FlowEvent {
        FlowEvent {
            verdict: verdict as u32,
            src_identity: src,
            dst_identity: dst,
            rule_id: rule,
            generation: 3,
            ..Default::default()
        }
    }

    #[test]
    fn replaced_generations_keep_their_names_for_a_while() {
        let start = Instant::now();
        let mut named = NamedGenerations::new(1, Arc::new(names()));
        let other = PolicyNames {
            rule_names: vec!["other".into()],
            ..names()
        };
        named.push(2, Arc::new(other), start);
        assert_eq!(named.of(1).unwrap().rule_name(1), "frontend-to-orders");
        assert_eq!(named.live().rule_name(1), "other");
        assert!(!named.forget_expired(start + NAMES_KEPT_AFTER_REPLACED / 2));
        assert!(named.forget_expired(start + NAMES_KEPT_AFTER_REPLACED));
        assert!(named.of(1).is_none());
        assert_eq!(named.of(2).unwrap().rule_name(1), "other");
    }

    #[test]
    fn at_most_eight_generations_are_named() {
        let now = Instant::now();
        let mut named = NamedGenerations::new(1, Arc::new(names()));
        for generation in 2..=10 {
            named.push(generation, Arc::new(names()), now);
        }
        assert_eq!(named.0.len(), NAMED_GENERATIONS);
        assert!(named.of(2).is_none() && named.of(3).is_some());
    }

    #[test]
    fn equal_names_are_shared_between_generations() {
        let mut named = NamedGenerations::new(1, Arc::new(names()));
        named.push(2, Arc::new(names()), Instant::now());
        assert!(Arc::ptr_eq(&named.0[0].names, &named.0[1].names));
    }

    #[test]
    fn events_are_named_by_their_generations_names() {
        let n = names();
        assert_eq!(
            name_event(Some(&n), &event(Verdict::DenyExpired, 256, 257, 1)),
            (
                "frontend".to_owned(),
                "orders".to_owned(),
                "frontend-to-orders".to_owned()
            )
        );
    }

    #[test]
    fn events_of_an_unknown_generation_say_so_instead_of_guessing() {
        let (from, to, rule) = name_event(None, &event(Verdict::DenyRevoked, 256, 257, 1));
        assert_eq!(
            (from.as_str(), to.as_str()),
            ("identity #256", "identity #257")
        );
        assert!(
            rule.starts_with("rule #1 (generation 3, not known"),
            "{rule}"
        );
    }

    #[test]
    fn spoofed_events_name_source_validation_and_unresolved_identities() {
        let n = names();
        let ev = event(
            Verdict::DropSpoofed,
            EVENT_IDENTITY_UNRESOLVED,
            EVENT_IDENTITY_UNRESOLVED,
            0,
        );
        assert_eq!(
            name_event(Some(&n), &ev),
            (
                "unresolved".to_owned(),
                "unresolved".to_owned(),
                "source validation".to_owned()
            )
        );
    }
}
