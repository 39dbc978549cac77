//! Kernel parameters: ONE list per kernel from which both the C signature and the launch
//! arguments are produced, so the two can never disagree on order or type.
//!
//! A [`Param`] is a [`Role`] (what the value means, which also fixes its C name) plus a
//! [`ParamTy`]. [`KernelSig::signature`] renders `extern "C" __global__ void name(...)`;
//! [`KernelSig::pack`] walks the same list and asks the caller for each role's value,
//! checking that the value has the parameter's type.

use std::fmt;

/// What a kernel parameter means. The C name is derived from the role.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// Device pointer to output `i`.
    Out(u8),
    /// Device pointer to input `i`.
    In(u8),
    /// Number of work items (elements, outputs, lanes…).
    N,
    /// Rank of the iteration shape of an index-mapping copy.
    Rank,
    /// Iteration shape of an index-mapping copy.
    Shape,
    OutStrides,
    OutOffset,
    InStrides,
    InOffset,
    /// Reductions: number of outputs and of elements reduced into each.
    NOut,
    NRed,
    KeptRank,
    KeptShape,
    KeptStrides,
    RedRank,
    RedShape,
    RedStrides,
    /// Length of the axis that argmax / topk / gather runs along.
    Len,
    /// Product of the dims after that axis.
    Inner,
    /// topk's k.
    K,
    /// gather: number of indices; size of the gathered axis.
    NIdx,
    Size,
    /// gather's index tensor.
    Ids,
    /// arange's first value.
    Start,
    /// attention sizes and attributes.
    Batch,
    Seq,
    Heads,
    KvHeads,
    Keys,
    HeadDim,
    ValueDim,
    Scale,
    MaskKind,
    Window,
    /// `const i64*`: the device table of symbol values (`syms[i]` is the value of the
    /// graph's `i`-th symbol in [`crate::symbols::graph_symbols`] order). Kernels that
    /// read sizes from it need no new arguments when a symbol changes, so a captured
    /// CUDA graph stays valid.
    Syms,
    // ---- the resident decode loop (`crate::resident`) ----
    /// Elements between batch entries of a device-resident KV cache.
    CacheBatchStride,
    // ---- bandwidth-bound decode kernels (`crate::decode`) ----
    /// GEMV sizes: `y [m, n] = x [m, k] · w [n, k]ᵀ`.
    MatM,
    MatN,
    MatK,
    /// Elements between batch entries of the K (resp. V) cache read by decode attention.
    KBatchStride,
    VBatchStride,
    /// Key chunks per (batch, kv head, query tile) of split-K decode attention.
    Splits,
    /// Decode attention may read the rows of earlier decode steps before it waits for
    /// the previous kernel (1 inside the engine's captured decode step, else 0).
    Early,
    /// `unsigned int*`: split-K decode attention's completion counters (zero between
    /// launches).
    Counters,
    /// Sampling: temperature (f32, 0 = greedy), top-k (i64, 0 = off), top-p (f32, 1 =
    /// off), seed (i64, used as 64 raw bits) and the device draw counter (`i64*`).
    Temperature,
    TopK,
    TopP,
    Seed,
    Step,
    /// Parameter `.1` of part `.0` of a horizontally fused kernel
    /// ([`crate::horizontal`]), C name `p{part}_{param}`.
    Part(u8, u8),
}

impl Role {
    /// The parameter's name in the C source.
    pub fn c_name(self) -> String {
        let s = match self {
            Role::Out(0) => "out",
            Role::Out(i) => return format!("out{i}"),
            Role::Part(p, i) => return format!("p{p}_{i}"),
            Role::In(0) => "in0",
            Role::In(i) => return format!("in{i}"),
            Role::N => "n",
            Role::Rank => "rank",
            Role::Shape => "shape",
            Role::OutStrides => "out_strides",
            Role::OutOffset => "out_offset",
            Role::InStrides => "in_strides",
            Role::InOffset => "in_offset",
            Role::NOut => "n_out",
            Role::NRed => "n_red",
            Role::KeptRank => "kept_rank",
            Role::KeptShape => "kept_shape",
            Role::KeptStrides => "kept_strides",
            Role::RedRank => "red_rank",
            Role::RedShape => "red_shape",
            Role::RedStrides => "red_strides",
            Role::Len => "len",
            Role::Inner => "inner",
            Role::K => "k",
            Role::NIdx => "nidx",
            Role::Size => "size",
            Role::Ids => "ids",
            Role::Start => "start",
            Role::Batch => "batch",
            Role::Seq => "seq",
            Role::Heads => "heads",
            Role::KvHeads => "kv_heads",
            Role::Keys => "keys",
            Role::HeadDim => "head_dim",
            Role::ValueDim => "value_dim",
            Role::Scale => "scale",
            Role::MaskKind => "mask_kind",
            Role::Window => "window",
            Role::Syms => "syms",
            Role::CacheBatchStride => "batch_stride",
            Role::MatM => "m",
            Role::MatN => "n",
            Role::MatK => "k",
            Role::KBatchStride => "k_batch_stride",
            Role::VBatchStride => "v_batch_stride",
            Role::Splits => "splits",
            Role::Early => "early",
            Role::Counters => "counters",
            Role::Temperature => "temperature",
            Role::TopK => "top_k",
            Role::TopP => "top_p",
            Role::Seed => "seed",
            Role::Step => "step",
        };
        s.to_string()
    }
}

/// The C type of a parameter.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ParamTy {
    /// `T*` (or `const T*`) to device memory; `T` is a C type name. Never
    /// `__restrict__`: kernels start before their predecessor has finished (programmatic
    /// dependent launch), and a restrict-qualified input would let the compiler hoist
    /// its loads above the wait for the predecessor (`kiln_grid_wait` in `kiln.cuh`).
    Ptr {
        elem: String,
        is_const: bool,
    },
    I64,
    I32,
    F32,
    /// `Idx8`: eight i64 passed by value (shapes, strides).
    Idx8,
}

impl ParamTy {
    pub fn ptr(elem: &str) -> ParamTy {
        ParamTy::Ptr { elem: elem.to_string(), is_const: false }
    }
    pub fn const_ptr(elem: &str) -> ParamTy {
        ParamTy::Ptr { elem: elem.to_string(), is_const: true }
    }
    fn render(&self, name: &str) -> String {
        match self {
            ParamTy::Ptr { elem, is_const: true } => format!("const {elem}* {name}"),
            ParamTy::Ptr { elem, is_const: false } => format!("{elem}* {name}"),
            ParamTy::I64 => format!("i64 {name}"),
            ParamTy::I32 => format!("int {name}"),
            ParamTy::F32 => format!("float {name}"),
            ParamTy::Idx8 => format!("Idx8 {name}"),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Param {
    pub role: Role,
    pub ty: ParamTy,
}

/// A launch argument value.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ArgValue {
    /// A device address.
    Ptr(u64),
    I64(i64),
    I32(i32),
    F32(f32),
    Idx8([i64; 8]),
}

impl ArgValue {
    /// Up to 8 dims, padded with zeros (callers check the rank).
    pub fn idx8(v: &[i64]) -> ArgValue {
        let mut a = [0i64; 8];
        a[..v.len()].copy_from_slice(v);
        ArgValue::Idx8(a)
    }
    fn fits(&self, ty: &ParamTy) -> bool {
        matches!(
            (self, ty),
            (ArgValue::Ptr(_), ParamTy::Ptr { .. })
                | (ArgValue::I64(_), ParamTy::I64)
                | (ArgValue::I32(_), ParamTy::I32)
                | (ArgValue::F32(_), ParamTy::F32)
                | (ArgValue::Idx8(_), ParamTy::Idx8)
        )
    }
    /// Address of the value's bytes, as `cuLaunchKernel` wants each argument.
    pub fn as_kernel_param(&mut self) -> *mut std::ffi::c_void {
        match self {
            ArgValue::Ptr(p) => p as *mut u64 as *mut _,
            ArgValue::I64(v) => v as *mut i64 as *mut _,
            ArgValue::I32(v) => v as *mut i32 as *mut _,
            ArgValue::F32(v) => v as *mut f32 as *mut _,
            ArgValue::Idx8(v) => v.as_mut_ptr() as *mut _,
        }
    }
}

/// A kernel's name and parameter list.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct KernelSig {
    pub name: String,
    pub params: Vec<Param>,
}

/// A role the caller could not supply, or supplied with the wrong type.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum PackError {
    #[error("kernel `{kernel}`: no value for parameter `{param}`")]
    Missing { kernel: String, param: String },
    #[error("kernel `{kernel}`: parameter `{param}` is {expected}, got {got}")]
    Type { kernel: String, param: String, expected: String, got: String },
}

impl KernelSig {
    pub fn new(name: impl Into<String>, params: Vec<(Role, ParamTy)>) -> KernelSig {
        KernelSig { name: name.into(), params: params.into_iter().map(|(role, ty)| Param { role, ty }).collect() }
    }

    /// `extern "C" __global__ void name(T* out, …)`.
    pub fn signature(&self) -> String {
        let ps: Vec<String> = self.params.iter().map(|p| p.ty.render(&p.role.c_name())).collect();
        format!("extern \"C\" __global__ void {}({})", self.name, ps.join(", "))
    }

    /// The launch arguments, in parameter order: `value(role)` for each parameter.
    pub fn pack(&self, mut value: impl FnMut(Role) -> Option<ArgValue>) -> Result<Vec<ArgValue>, PackError> {
        self.params
            .iter()
            .map(|p| {
                let v = value(p.role)
                    .ok_or_else(|| PackError::Missing { kernel: self.name.clone(), param: p.role.c_name() })?;
                if !v.fits(&p.ty) {
                    return Err(PackError::Type {
                        kernel: self.name.clone(),
                        param: p.role.c_name(),
                        expected: format!("{:?}", p.ty),
                        got: format!("{v:?}"),
                    });
                }
                Ok(v)
            })
            .collect()
    }
}

impl fmt::Display for KernelSig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.signature())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sig() -> KernelSig {
        KernelSig::new(
            "k",
            vec![
                (Role::Out(0), ParamTy::ptr("float")),
                (Role::In(0), ParamTy::const_ptr("kiln_bf16")),
                (Role::N, ParamTy::I64),
                (Role::Shape, ParamTy::Idx8),
                (Role::Scale, ParamTy::F32),
            ],
        )
    }

    #[test]
    fn signature_and_arguments_come_from_one_list() {
        assert_eq!(
            sig().signature(),
            "extern \"C\" __global__ void k(float* out, const kiln_bf16* in0, i64 n, \
             Idx8 shape, float scale)"
        );
        // Values are asked for by role, in parameter order, whatever order the caller keeps.
        let mut asked = Vec::new();
        let args = sig()
            .pack(|r| {
                asked.push(r);
                Some(match r {
                    Role::Out(_) => ArgValue::Ptr(16),
                    Role::In(_) => ArgValue::Ptr(32),
                    Role::N => ArgValue::I64(7),
                    Role::Shape => ArgValue::idx8(&[2, 3]),
                    _ => ArgValue::F32(0.5),
                })
            })
            .unwrap();
        assert_eq!(asked, [Role::Out(0), Role::In(0), Role::N, Role::Shape, Role::Scale]);
        assert_eq!(args[3], ArgValue::Idx8([2, 3, 0, 0, 0, 0, 0, 0]));
        let e = sig().pack(|_| Some(ArgValue::Ptr(0))).unwrap_err();
        assert_eq!(e.to_string(), "kernel `k`: parameter `n` is I64, got Ptr(0)");
        let e = sig().pack(|r| matches!(r, Role::Out(_)).then_some(ArgValue::Ptr(0))).unwrap_err();
        assert_eq!(e.to_string(), "kernel `k`: no value for parameter `in0`");
    }
}
