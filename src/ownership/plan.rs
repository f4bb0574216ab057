//! Who should own what: given the fleet's live members and each partition's
//! owner, what this worker claims and what it gives up. Pure, so the rule is
//! tested without a database or a broker.
//!
//! Every member computes the same shares from the same member list: P
//! partitions over M members is ⌊P/M⌋ each, and the first P mod M members (in
//! the list's order) take one more. A worker over its share gives up its
//! highest partitions; one under it claims the lowest free ones. Nobody takes a
//! partition that another live owner holds: it waits until that owner has
//! handed it over (or died and let its lease expire). So the fleet converges to
//! every worker owning ⌊P/M⌋ or ⌈P/M⌉, and a partition changes hands only
//! between a release and a claim.

use std::collections::BTreeSet;

/// This worker's share of `partitions` among `members` (which should hold
/// `me`; if it does not yet, it counts as the last member).
pub fn share(members: &[String], me: &str, partitions: u16) -> usize {
    let partitions = usize::from(partitions);
    let (count, rank) = match members.iter().position(|m| m == me) {
        Some(rank) => (members.len(), rank),
        None => (members.len() + 1, members.len()),
    };
    partitions / count + usize::from(rank < partitions % count)
}

/// What to do this tick.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Free partitions to claim, lowest first.
    pub claim: Vec<u16>,
    /// Held partitions to hand over, highest first.
    pub release: Vec<u16>,
}

/// The plan for `me`, who holds `held` (of which `releasing` are already being
/// handed over), given the live `members` and each partition's current owner
/// (`owners[p]`, `None` when free or expired).
pub fn plan(
    members: &[String],
    me: &str,
    owners: &[Option<String>],
    held: &BTreeSet<u16>,
    releasing: &BTreeSet<u16>,
) -> Plan {
    let partitions = u16::try_from(owners.len()).unwrap_or(u16::MAX);
    let share = share(members, me, partitions);
    let keeping: Vec<u16> = held.difference(releasing).copied().collect();
    let mut plan = Plan::default();
    if keeping.len() > share {
        plan.release = keeping
            .iter()
            .rev()
            .take(keeping.len() - share)
            .copied()
            .collect();
    } else if held.len() < share {
        // Free ones, and ones the database still gives to `me` (held before a
        // dropped connection, not yet claimed by anyone else).
        plan.claim = owners
            .iter()
            .enumerate()
            .filter(|(partition, owner)| {
                owner.as_deref().is_none_or(|owner| owner == me)
                    && !held.contains(&(*partition as u16))
            })
            .map(|(partition, _)| partition as u16)
            .take(share - held.len())
            .collect();
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(names: &[&str]) -> Vec<String> {
        names.iter().map(|n| (*n).to_owned()).collect()
    }

    fn set(partitions: &[u16]) -> BTreeSet<u16> {
        partitions.iter().copied().collect()
    }

    #[test]
    fn shares_are_the_floor_or_the_ceiling_and_add_up_to_every_partition() {
        for partitions in [1u16, 2, 7, 8, 9, 64] {
            for count in 1..=10 {
                let members: Vec<String> = (0..count).map(|n| format!("w{n:02}")).collect();
                let shares: Vec<usize> = members
                    .iter()
                    .map(|m| share(&members, m, partitions))
                    .collect();
                let p = usize::from(partitions);
                assert_eq!(shares.iter().sum::<usize>(), p, "{partitions} over {count}");
                for s in shares {
                    assert!(
                        s == p / count || s == p.div_ceil(count),
                        "{s} of {p} over {count}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_worker_not_yet_listed_counts_itself_last() {
        let members = names(&["a", "b"]);
        assert_eq!(share(&members, "c", 8), 2);
        assert_eq!(share(&members, "a", 8), 4);
    }

    #[test]
    fn a_lone_worker_claims_every_free_partition() {
        let owners = vec![None; 4];
        let plan = plan(&names(&["a"]), "a", &owners, &set(&[]), &set(&[]));
        assert_eq!(plan.claim, [0, 1, 2, 3]);
        assert!(plan.release.is_empty());
    }

    #[test]
    fn a_worker_over_its_share_gives_up_its_highest_partitions() {
        let owners: Vec<Option<String>> = (0..8).map(|_| Some("a".to_owned())).collect();
        let held = set(&[0, 1, 2, 3, 4, 5, 6, 7]);
        let plan = plan(&names(&["a", "b", "c"]), "a", &owners, &held, &set(&[]));
        // 8 over 3: a (first) keeps 3.
        assert_eq!(plan.release, [7, 6, 5, 4, 3]);
        assert!(plan.claim.is_empty());
    }

    #[test]
    fn partitions_already_being_handed_over_are_not_given_up_twice() {
        let owners: Vec<Option<String>> = (0..4).map(|_| Some("a".to_owned())).collect();
        let plan = plan(
            &names(&["a", "b"]),
            "a",
            &owners,
            &set(&[0, 1, 2, 3]),
            &set(&[3]),
        );
        assert_eq!(plan.release, [2]);
    }

    #[test]
    fn a_newcomer_waits_for_partitions_another_live_owner_holds() {
        let owners: Vec<Option<String>> = (0..4).map(|_| Some("a".to_owned())).collect();
        let plan = plan(&names(&["a", "b"]), "b", &owners, &set(&[]), &set(&[]));
        assert!(plan.claim.is_empty(), "{plan:?}");
        let mut freed = owners.clone();
        freed[3] = None;
        let plan = super::plan(&names(&["a", "b"]), "b", &freed, &set(&[]), &set(&[]));
        assert_eq!(plan.claim, [3]);
    }

    #[test]
    fn partitions_still_leased_to_me_are_taken_again_after_a_reconnect() {
        let owners = vec![Some("a".to_owned()), Some("b".to_owned())];
        let plan = plan(&names(&["a", "b"]), "a", &owners, &set(&[]), &set(&[]));
        assert_eq!(plan.claim, [0]);
    }

    #[test]
    fn a_worker_at_its_share_does_nothing() {
        let owners = vec![Some("a".to_owned()), Some("b".to_owned()), None];
        let plan = plan(&names(&["a", "b"]), "b", &owners, &set(&[1]), &set(&[]));
        // 3 over 2: a takes 2, b takes 1; the free one is a's to claim.
        assert_eq!(plan, Plan::default());
    }

    #[test]
    fn the_fleet_converges_to_an_even_spread_from_any_start() {
        // Simulate ticks: each member plans against the same view, claims
        // succeed for the first asker, releases free the partition.
        let members = names(&["a", "b", "c"]);
        let mut owners: Vec<Option<String>> = (0..8).map(|_| Some("a".to_owned())).collect();
        for _ in 0..10 {
            for me in &members {
                let held: BTreeSet<u16> = owners
                    .iter()
                    .enumerate()
                    .filter(|(_, o)| o.as_deref() == Some(me.as_str()))
                    .map(|(p, _)| p as u16)
                    .collect();
                let plan = plan(&members, me, &owners, &held, &BTreeSet::new());
                for p in plan.release {
                    owners[usize::from(p)] = None;
                }
                for p in plan.claim {
                    owners[usize::from(p)].get_or_insert_with(|| me.clone());
                }
            }
        }
        let mut counts: Vec<usize> = members
            .iter()
            .map(|m| {
                owners
                    .iter()
                    .filter(|o| o.as_deref() == Some(m.as_str()))
                    .count()
            })
            .collect();
        counts.sort_unstable();
        assert_eq!(counts, [2, 3, 3]);
        assert!(owners.iter().all(Option::is_some));
    }
}
