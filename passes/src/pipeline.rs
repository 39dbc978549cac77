//! The default pass pipeline, top to bottom.

use crate::{Cse, Dce, Pass, PassManager, Simplify};

/// The passes every model goes through, in order.
pub fn default_pipeline() -> PassManager {
    let passes: Vec<Box<dyn Pass>> = vec![
        // Canonicalize: fold movement/cast chains and identities, merge duplicates,
        // then drop what no output needs.
        Box::new(Simplify),
        Box::new(Cse),
        Box::new(Dce),
    ];
    PassManager::new(passes)
}
