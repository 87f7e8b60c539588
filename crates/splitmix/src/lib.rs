//! The splitmix64 mixer, in a crate of its own because two crates that must not depend on
//! each other use it: `masklm-model` draws its dropout masks from it and `masklm-data` its
//! per-source seeds and validation split. `model` knows only burn, and `data` (tokenizers,
//! Parquet, zstd) has no business pulling in the model, nor the model the corpus readers.

/// The splitmix64 mixer (Steele, Lea and Flood 2014; Vigna's `splitmix64.c`): a well-spread
/// 64-bit hash of `z`, for seeds, stable splits and counter-based random streams.
/// `splitmix64(s)` is the first output of a SplitMix64 generator in state `s`.
#[inline]
pub fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equals_the_reference_generator() {
        // The first three outputs of Vigna's splitmix64.c seeded with 0: each call adds the
        // increment to the state, then mixes it, so output k is splitmix64(k * increment).
        let want = [
            0xE220_A839_7B1D_CDAF,
            0x6E78_9E6A_A1B9_65F4,
            0x06C4_5D18_8009_454F,
        ];
        for (k, want) in want.into_iter().enumerate() {
            let state = (k as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            assert_eq!(splitmix64(state), want, "output {k}");
        }
    }
}
