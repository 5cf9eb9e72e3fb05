//! What a user may ask of the sampler. The CLI, the API and the studio all check requests
//! against these, so one request is refused (or accepted) the same way everywhere.

use std::ops::RangeInclusive;

/// Denoising steps per frame. 200 bounds one frame's time (a job holds the only worker of a
/// device); no scheduler here improves past it.
pub const STEPS: RangeInclusive<usize> = 1..=200;

/// Classifier-free guidance scale; 1 turns guidance off, past 30 images saturate.
pub const GUIDANCE: RangeInclusive<f64> = 1.0..=30.0;

/// Largest seed: 2^53 - 1, so a seed survives a round trip through JSON in a browser.
pub const MAX_SEED: u64 = (1 << 53) - 1;

/// `Ok` when `steps` is allowed, else the message to show.
pub fn check_steps(steps: usize) -> Result<(), String> {
    if STEPS.contains(&steps) {
        Ok(())
    } else {
        Err(format!(
            "steps must be between {} and {}; got {steps}",
            STEPS.start(),
            STEPS.end()
        ))
    }
}

/// `Ok` when `scale` is allowed, else the message to show.
pub fn check_guidance(scale: f64) -> Result<(), String> {
    if scale.is_finite() && GUIDANCE.contains(&scale) {
        Ok(())
    } else {
        Err(format!(
            "guidance_scale must be between {} and {}; got {scale}",
            GUIDANCE.start(),
            GUIDANCE.end()
        ))
    }
}

/// `Ok` when `seed` is allowed, else the message to show.
pub fn check_seed(seed: u64) -> Result<(), String> {
    if seed <= MAX_SEED {
        Ok(())
    } else {
        Err(format!(
            "seeds go from 0 to {MAX_SEED} (2^53 - 1); got {seed}"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_are_inclusive_and_messages_name_them() {
        assert!(check_steps(1).is_ok() && check_steps(200).is_ok());
        assert_eq!(
            check_steps(201).unwrap_err(),
            "steps must be between 1 and 200; got 201"
        );
        assert!(check_steps(0).is_err());
        assert!(check_guidance(1.0).is_ok() && check_guidance(30.0).is_ok());
        assert!(check_guidance(0.5).is_err() && check_guidance(f64::NAN).is_err());
        assert!(check_seed(MAX_SEED).is_ok() && check_seed(MAX_SEED + 1).is_err());
    }
}
