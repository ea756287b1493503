//! Overlong reward shaping (DAPO): with a response budget L_max and a buffer L_cache, a
//! response longer than L_max - L_cache loses linearly up to 1 at L_max, and 1 past it.

/// The length penalty (<= 0) of a response of `length` tokens.
pub fn overlong_penalty(length: usize, max_len: usize, cache: usize) -> f32 {
    let soft = max_len.saturating_sub(cache);
    if length <= soft {
        0.0
    } else if length <= max_len {
        (soft as f32 - length as f32) / cache.max(1) as f32
    } else {
        -1.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn penalty_values() {
        // L_max 10000, L_cache 1000 (the paper's values).
        assert_eq!(overlong_penalty(8000, 10_000, 1000), 0.0);
        assert_eq!(overlong_penalty(9000, 10_000, 1000), 0.0);
        assert_eq!(overlong_penalty(9500, 10_000, 1000), -0.5);
        assert_eq!(overlong_penalty(10_000, 10_000, 1000), -1.0);
        assert_eq!(overlong_penalty(10_001, 10_000, 1000), -1.0);
        assert_eq!(overlong_penalty(5, 10, 0), 0.0);
    }
}
