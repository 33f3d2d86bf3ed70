//! Element types and the typed buffer every operation moves.

use half::{bf16, f16};

/// Element type of a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F64,
    BF16,
    F16,
    I32,
    I64,
    U8,
}

impl DType {
    /// Every element type, for tests that cover them all.
    pub const ALL: [DType; 7] = [
        DType::F32,
        DType::F64,
        DType::BF16,
        DType::F16,
        DType::I32,
        DType::I64,
        DType::U8,
    ];

    /// Bytes per element.
    pub fn size_bytes(self) -> usize {
        match self {
            DType::F32 | DType::I32 => 4,
            DType::F64 | DType::I64 => 8,
            DType::BF16 | DType::F16 => 2,
            DType::U8 => 1,
        }
    }

    /// Floating point (mean is defined only for these).
    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F64 | DType::BF16 | DType::F16)
    }

    /// Short lower-case name (`f32`, `bf16`, ...).
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F64 => "f64",
            DType::BF16 => "bf16",
            DType::F16 => "f16",
            DType::I32 => "i32",
            DType::I64 => "i64",
            DType::U8 => "u8",
        }
    }

    /// Stable small integer code, used in wire signatures.
    pub fn code(self) -> u8 {
        self as u8
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Reduction operator of all-reduce and reduce-scatter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReduceOp {
    Sum,
    /// Sum divided by the communicator size; floating point element types only.
    Mean,
    Max,
}

/// A typed, owned, contiguous buffer. Owned so that a non-blocking operation can hold it
/// until it completes (and keep holding it if it never does), which makes the non-blocking
/// API memory safe.
#[derive(Debug, Clone, PartialEq)]
pub enum Buffer {
    F32(Vec<f32>),
    F64(Vec<f64>),
    BF16(Vec<bf16>),
    F16(Vec<f16>),
    I32(Vec<i32>),
    I64(Vec<i64>),
    U8(Vec<u8>),
}

impl Default for Buffer {
    fn default() -> Self {
        Buffer::U8(Vec::new())
    }
}

/// Applies `$body` to the vector inside any `Buffer` variant.
#[macro_export]
#[doc(hidden)]
macro_rules! with_buffer {
    ($buf:expr, $v:ident => $body:expr) => {
        match $buf {
            $crate::Buffer::F32($v) => $body,
            $crate::Buffer::F64($v) => $body,
            $crate::Buffer::BF16($v) => $body,
            $crate::Buffer::F16($v) => $body,
            $crate::Buffer::I32($v) => $body,
            $crate::Buffer::I64($v) => $body,
            $crate::Buffer::U8($v) => $body,
        }
    };
}

impl Buffer {
    /// `n` zero elements of type `dtype`.
    pub fn zeros(dtype: DType, n: usize) -> Buffer {
        match dtype {
            DType::F32 => Buffer::F32(vec![0.0; n]),
            DType::F64 => Buffer::F64(vec![0.0; n]),
            DType::BF16 => Buffer::BF16(vec![bf16::ZERO; n]),
            DType::F16 => Buffer::F16(vec![f16::ZERO; n]),
            DType::I32 => Buffer::I32(vec![0; n]),
            DType::I64 => Buffer::I64(vec![0; n]),
            DType::U8 => Buffer::U8(vec![0; n]),
        }
    }

    /// `n` elements, element `i` being `f(i)` converted (exactly for small integers).
    pub fn from_fn(dtype: DType, n: usize, f: impl Fn(usize) -> f64) -> Buffer {
        match dtype {
            DType::F32 => Buffer::F32((0..n).map(|i| f(i) as f32).collect()),
            DType::F64 => Buffer::F64((0..n).map(&f).collect()),
            DType::BF16 => Buffer::BF16((0..n).map(|i| bf16::from_f64(f(i))).collect()),
            DType::F16 => Buffer::F16((0..n).map(|i| f16::from_f64(f(i))).collect()),
            DType::I32 => Buffer::I32((0..n).map(|i| f(i) as i32).collect()),
            DType::I64 => Buffer::I64((0..n).map(|i| f(i) as i64).collect()),
            DType::U8 => Buffer::U8((0..n).map(|i| f(i) as u8).collect()),
        }
    }

    pub fn dtype(&self) -> DType {
        match self {
            Buffer::F32(_) => DType::F32,
            Buffer::F64(_) => DType::F64,
            Buffer::BF16(_) => DType::BF16,
            Buffer::F16(_) => DType::F16,
            Buffer::I32(_) => DType::I32,
            Buffer::I64(_) => DType::I64,
            Buffer::U8(_) => DType::U8,
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        with_buffer!(self, v => v.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Size in bytes.
    pub fn size_bytes(&self) -> usize {
        self.len() * self.dtype().size_bytes()
    }

    /// The elements as bytes (native endianness).
    pub fn as_bytes(&self) -> &[u8] {
        with_buffer!(self, v => bytemuck::cast_slice(v.as_slice()))
    }

    /// The elements as mutable bytes.
    pub fn as_bytes_mut(&mut self) -> &mut [u8] {
        with_buffer!(self, v => bytemuck::cast_slice_mut(v.as_mut_slice()))
    }

    /// Element `i` as f64 (for checks and reductions in tests).
    pub fn get_f64(&self, i: usize) -> f64 {
        match self {
            Buffer::F32(v) => v[i] as f64,
            Buffer::F64(v) => v[i],
            Buffer::BF16(v) => v[i].to_f64(),
            Buffer::F16(v) => v[i].to_f64(),
            Buffer::I32(v) => v[i] as f64,
            Buffer::I64(v) => v[i] as f64,
            Buffer::U8(v) => v[i] as f64,
        }
    }

    /// A copy of elements `range`.
    pub fn slice(&self, range: std::ops::Range<usize>) -> Buffer {
        match self {
            Buffer::F32(v) => Buffer::F32(v[range].to_vec()),
            Buffer::F64(v) => Buffer::F64(v[range].to_vec()),
            Buffer::BF16(v) => Buffer::BF16(v[range].to_vec()),
            Buffer::F16(v) => Buffer::F16(v[range].to_vec()),
            Buffer::I32(v) => Buffer::I32(v[range].to_vec()),
            Buffer::I64(v) => Buffer::I64(v[range].to_vec()),
            Buffer::U8(v) => Buffer::U8(v[range].to_vec()),
        }
    }

    /// Copies `src[src_range]` into `self` at element offset `at`. Types must match.
    pub fn copy_from(&mut self, at: usize, src: &Buffer, src_range: std::ops::Range<usize>) {
        let es = self.dtype().size_bytes();
        assert_eq!(self.dtype(), src.dtype(), "copy_from between element types");
        let n = src_range.len() * es;
        let s = &src.as_bytes()[src_range.start * es..src_range.start * es + n];
        self.as_bytes_mut()[at * es..at * es + n].copy_from_slice(s);
    }

    /// The concatenation of `parts` (a buffer and an element range of it, each), of type
    /// `dtype`. Writes each element once (no zero fill first).
    pub fn concat(dtype: DType, parts: &[(&Buffer, std::ops::Range<usize>)]) -> Buffer {
        let total = parts.iter().map(|(_, r)| r.len()).sum();
        let mut out = match dtype {
            DType::F32 => Buffer::F32(Vec::with_capacity(total)),
            DType::F64 => Buffer::F64(Vec::with_capacity(total)),
            DType::BF16 => Buffer::BF16(Vec::with_capacity(total)),
            DType::F16 => Buffer::F16(Vec::with_capacity(total)),
            DType::I32 => Buffer::I32(Vec::with_capacity(total)),
            DType::I64 => Buffer::I64(Vec::with_capacity(total)),
            DType::U8 => Buffer::U8(Vec::with_capacity(total)),
        };
        for (src, r) in parts {
            match (&mut out, src) {
                (Buffer::F32(a), Buffer::F32(b)) => a.extend_from_slice(&b[r.clone()]),
                (Buffer::F64(a), Buffer::F64(b)) => a.extend_from_slice(&b[r.clone()]),
                (Buffer::BF16(a), Buffer::BF16(b)) => a.extend_from_slice(&b[r.clone()]),
                (Buffer::F16(a), Buffer::F16(b)) => a.extend_from_slice(&b[r.clone()]),
                (Buffer::I32(a), Buffer::I32(b)) => a.extend_from_slice(&b[r.clone()]),
                (Buffer::I64(a), Buffer::I64(b)) => a.extend_from_slice(&b[r.clone()]),
                (Buffer::U8(a), Buffer::U8(b)) => a.extend_from_slice(&b[r.clone()]),
                (a, b) => panic!("concat of {} elements into {}", b.dtype(), a.dtype()),
            }
        }
        out
    }

    /// Typed view; `None` if the element type differs.
    pub fn as_slice<T: Element>(&self) -> Option<&[T]> {
        T::view(self)
    }

    /// The typed vector; `Err(self)` if the element type differs.
    pub fn into_vec<T: Element>(self) -> std::result::Result<Vec<T>, Buffer> {
        T::unwrap(self)
    }

    /// Element-wise `self = self (op) other`; `Mean` accumulates a sum. Types and lengths
    /// must match (checked by callers). bf16/f16 are accumulated through f32.
    pub fn reduce_assign(&mut self, other: &Buffer, op: ReduceOp) {
        fn go<T: Copy>(a: &mut [T], b: &[T], f: impl Fn(T, T) -> T) {
            for (x, y) in a.iter_mut().zip(b) {
                *x = f(*x, *y);
            }
        }
        let max = matches!(op, ReduceOp::Max);
        match (self, other) {
            (Buffer::F32(a), Buffer::F32(b)) => go(a, b, |x, y| if max { x.max(y) } else { x + y }),
            (Buffer::F64(a), Buffer::F64(b)) => go(a, b, |x, y| if max { x.max(y) } else { x + y }),
            (Buffer::BF16(a), Buffer::BF16(b)) => go(a, b, |x, y| {
                let (x, y) = (x.to_f32(), y.to_f32());
                bf16::from_f32(if max { x.max(y) } else { x + y })
            }),
            (Buffer::F16(a), Buffer::F16(b)) => go(a, b, |x, y| {
                let (x, y) = (x.to_f32(), y.to_f32());
                f16::from_f32(if max { x.max(y) } else { x + y })
            }),
            (Buffer::I32(a), Buffer::I32(b)) => {
                go(a, b, |x, y| if max { x.max(y) } else { x.wrapping_add(y) })
            }
            (Buffer::I64(a), Buffer::I64(b)) => {
                go(a, b, |x, y| if max { x.max(y) } else { x.wrapping_add(y) })
            }
            (Buffer::U8(a), Buffer::U8(b)) => {
                go(a, b, |x, y| if max { x.max(y) } else { x.wrapping_add(y) })
            }
            (a, b) => panic!("reduce_assign: {} vs {}", a.dtype(), b.dtype()),
        }
    }

    /// Divides every element by `n` (the `Mean` finish); floating point types only.
    pub fn scale_inv(&mut self, n: usize) {
        let d = n as f64;
        match self {
            Buffer::F32(v) => v.iter_mut().for_each(|x| *x /= d as f32),
            Buffer::F64(v) => v.iter_mut().for_each(|x| *x /= d),
            Buffer::BF16(v) => v
                .iter_mut()
                .for_each(|x| *x = bf16::from_f64(x.to_f64() / d)),
            Buffer::F16(v) => v
                .iter_mut()
                .for_each(|x| *x = f16::from_f64(x.to_f64() / d)),
            _ => {}
        }
    }
}

/// A Rust element type the layer can move.
pub trait Element: bytemuck::Pod + Send + Sync + PartialEq + std::fmt::Debug + 'static {
    const DTYPE: DType;
    fn wrap(v: Vec<Self>) -> Buffer;
    fn unwrap(b: Buffer) -> std::result::Result<Vec<Self>, Buffer>;
    fn view(b: &Buffer) -> Option<&[Self]>;
}

macro_rules! element {
    ($t:ty, $variant:ident) => {
        impl Element for $t {
            const DTYPE: DType = DType::$variant;
            fn wrap(v: Vec<Self>) -> Buffer {
                Buffer::$variant(v)
            }
            fn unwrap(b: Buffer) -> std::result::Result<Vec<Self>, Buffer> {
                match b {
                    Buffer::$variant(v) => Ok(v),
                    other => Err(other),
                }
            }
            fn view(b: &Buffer) -> Option<&[Self]> {
                match b {
                    Buffer::$variant(v) => Some(v),
                    _ => None,
                }
            }
        }
        impl From<Vec<$t>> for Buffer {
            fn from(v: Vec<$t>) -> Buffer {
                Buffer::$variant(v)
            }
        }
    };
}
element!(f32, F32);
element!(f64, F64);
element!(bf16, BF16);
element!(f16, F16);
element!(i32, I32);
element!(i64, I64);
element!(u8, U8);
