//! The request mix of a bench run, drawn from a seeded generator (`fastrand`) so
//! that a seed repeats a run exactly.

use super::BenchArgs;
use uuid::Uuid;

/// One planned request.
pub(super) struct Planned {
    pub message_id: String,
    pub item: Uuid,
    pub delta: i64,
}

pub(super) fn plan(args: &BenchArgs, items: &[Uuid]) -> Vec<Planned> {
    let mut mix = fastrand::Rng::with_seed(args.seed);
    let run = Uuid::new_v4().simple().to_string();
    let mut planned: Vec<Planned> = Vec::with_capacity(args.messages);
    for n in 0..args.messages {
        if n > 0 && mix.f64() < args.duplicate_share {
            let earlier = &planned[mix.usize(..n)];
            let repeat = Planned {
                message_id: earlier.message_id.clone(),
                item: earlier.item,
                delta: earlier.delta,
            };
            planned.push(repeat);
            continue;
        }
        let item = if mix.f64() < args.hot_share {
            items[0]
        } else {
            items[mix.usize(..items.len())]
        };
        let delta = mix.i64(args.delta_min..=args.delta_max);
        planned.push(Planned {
            message_id: format!("bench-{run}-{n}"),
            item,
            delta,
        });
    }
    planned
}
