//! The default pass pipeline, top to bottom.

use crate::{ConstFold, Cse, Dce, Pass, PassManager, Simplify};

/// The passes every model goes through, in order.
pub fn default_pipeline() -> PassManager {
    let passes: Vec<Box<dyn Pass>> = vec![
        // Canonicalize: evaluate what depends on constants only, fold movement/cast
        // chains and identities, merge duplicates, then drop what no output needs.
        Box::new(ConstFold),
        Box::new(Simplify),
        Box::new(Cse),
        Box::new(Dce),
    ];
    PassManager::new(passes)
}
