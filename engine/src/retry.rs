//! Retry delays: exponential backoff with deterministic jitter.
//!
//! The delay before attempt k+1 is `min(maxDelay, base × multiplier^(k−1))`, then jittered. The
//! jitter's randomness is derived from (run id, stage, attempt) through blake3, so the same run id
//! always gives the same delays: tests are deterministic and audits reproducible.

use crate::spec::raw::RawJitter;
use crate::spec::RetryPolicy;

/// The delay in milliseconds before attempt `next` (2 for the first retry).
pub fn delay_ms(policy: &RetryPolicy, run_id: &str, stage: &str, next: u32) -> u64 {
    let exponent = next.saturating_sub(2) as i32;
    let raw = policy.base_delay_ms as f64 * policy.multiplier.powi(exponent);
    let capped = raw.min(policy.max_delay_ms as f64).max(0.0) as u64;
    let unit = unit_random(run_id, stage, next);
    match policy.jitter {
        RawJitter::None => capped,
        RawJitter::Full => (capped as f64 * unit) as u64,
        RawJitter::Equal => capped / 2 + ((capped - capped / 2) as f64 * unit) as u64,
    }
}

/// A number in [0, 1) determined by its arguments.
fn unit_random(run_id: &str, stage: &str, attempt: u32) -> f64 {
    let mut hasher = blake3::Hasher::new();
    hasher.update(b"pipe retry jitter v1\0");
    hasher.update(run_id.as_bytes());
    hasher.update(b"\0");
    hasher.update(stage.as_bytes());
    hasher.update(&attempt.to_le_bytes());
    let bytes: [u8; 8] = hasher.finalize().as_bytes()[..8]
        .try_into()
        .expect("8 bytes");
    (u64::from_le_bytes(bytes) >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn policy(jitter: RawJitter, base: u64, max: u64, multiplier: f64) -> RetryPolicy {
        RetryPolicy {
            max_attempts: 10,
            base_delay_ms: base,
            max_delay_ms: max,
            multiplier,
            jitter,
            retryable_exit_codes: vec![75],
            retry_on_timeout: false,
            timeout: None,
        }
    }

    #[test]
    fn without_jitter_the_schedule_is_exponential_and_capped() {
        let p = policy(RawJitter::None, 100, 1000, 2.0);
        let delays: Vec<u64> = (2..=7).map(|k| delay_ms(&p, "r", "s", k)).collect();
        assert_eq!(delays, vec![100, 200, 400, 800, 1000, 1000]);
    }

    #[test]
    fn the_same_run_id_gives_the_same_delays() {
        let p = policy(RawJitter::Full, 100, 10_000, 2.0);
        let a: Vec<u64> = (2..6).map(|k| delay_ms(&p, "run-a", "s", k)).collect();
        let b: Vec<u64> = (2..6).map(|k| delay_ms(&p, "run-a", "s", k)).collect();
        let c: Vec<u64> = (2..6).map(|k| delay_ms(&p, "run-b", "s", k)).collect();
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    proptest! {
        #[test]
        fn delays_stay_within_their_bounds(base in 0u64..10_000, extra in 0u64..100_000, multiplier in 1.0f64..10.0, next in 2u32..40, run in "[a-z0-9]{1,12}") {
            let max = base + extra;
            let none = delay_ms(&policy(RawJitter::None, base, max, multiplier), &run, "s", next);
            prop_assert!(none <= max);
            prop_assert!(none >= base.min(max));
            let earlier = delay_ms(&policy(RawJitter::None, base, max, multiplier), &run, "s", next.saturating_sub(1).max(2));
            prop_assert!(earlier <= none);
            let full = delay_ms(&policy(RawJitter::Full, base, max, multiplier), &run, "s", next);
            prop_assert!(full <= none);
            let equal = delay_ms(&policy(RawJitter::Equal, base, max, multiplier), &run, "s", next);
            prop_assert!(equal >= none / 2 && equal <= none);
        }
    }
}
