//! The prefix cache's keys: a full block is named by a hash chained through every block before
//! it (vLLM's scheme), so equal hashes mean equal token prefixes, not just equal blocks. The
//! chain starts at a root that names everything else the contents depend on (model, weight and
//! KV dtypes, block size): two pools agree on a hash only when their blocks would hold the same
//! numbers. The hasher is SipHash with fixed keys: the same tokens give the same hash in every
//! process of one build, so workers of one model can compare hashes (routing on prefixes).

use std::hash::{Hash, Hasher};

/// The hash chain's start for blocks computed under `identity` (a description of the model and
/// everything that changes the K/V it writes).
pub fn root_hash(identity: &str) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    "rrt-kv-root".hash(&mut h);
    identity.hash(&mut h);
    h.finish()
}

/// The hash of a full block of `tokens` after the block whose hash is `parent`.
pub fn block_hash(parent: u64, tokens: &[u32]) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    parent.hash(&mut h);
    tokens.hash(&mut h);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_chain_names_the_whole_prefix() {
        let root = root_hash("m");
        let a = block_hash(root, &[1, 2]);
        assert_eq!(a, block_hash(root_hash("m"), &[1, 2]), "deterministic");
        assert_ne!(a, block_hash(root_hash("other model"), &[1, 2]));
        assert_ne!(
            block_hash(a, &[3, 4]),
            block_hash(block_hash(root, &[9, 9]), &[3, 4])
        );
        assert_ne!(a, block_hash(root, &[2, 1]));
    }
}
