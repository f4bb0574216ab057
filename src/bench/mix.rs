//! The request mix of a bench run, drawn from a seeded generator so that a seed
//! repeats a run exactly.

use super::BenchArgs;
use uuid::Uuid;

/// One planned request.
pub(super) struct Planned {
    pub message_id: String,
    pub item: Uuid,
    pub delta: i64,
}

/// A small deterministic generator (SplitMix64), so a seed repeats a run's mix.
/// The equivalence tests draw their random streams from it too.
pub struct Mix(pub u64);

impl Mix {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

pub(super) fn plan(args: &BenchArgs, items: &[Uuid]) -> Vec<Planned> {
    let mut mix = Mix(args.seed);
    let run = Uuid::new_v4().simple().to_string();
    let span = (args.delta_max - args.delta_min + 1) as u64;
    let mut planned: Vec<Planned> = Vec::with_capacity(args.messages);
    for n in 0..args.messages {
        if n > 0 && mix.unit() < args.duplicate_share {
            let earlier = &planned[mix.below(n as u64) as usize];
            let repeat = Planned {
                message_id: earlier.message_id.clone(),
                item: earlier.item,
                delta: earlier.delta,
            };
            planned.push(repeat);
            continue;
        }
        let item = if mix.unit() < args.hot_share {
            items[0]
        } else {
            items[mix.below(items.len() as u64) as usize]
        };
        let delta = args.delta_min + mix.below(span) as i64;
        planned.push(Planned {
            message_id: format!("bench-{run}-{n}"),
            item,
            delta,
        });
    }
    planned
}
