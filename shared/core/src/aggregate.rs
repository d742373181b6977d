//! Aggregators: how the engine combines the nodes' answers to one step.
//!
//! The default, [`ExactSum`], is exact, order-independent and streaming. Floating-point
//! addition is not associative, so a running `f64` sum would depend on the order in which
//! answers arrive. Instead every value is converted to fixed point (`FRAC_BITS` fractional
//! bits, truncated toward zero: a deterministic function of the value alone) and multiplied by
//! the answer's integer weight; these `i128` products are summed exactly. Integer addition is
//! associative and commutative, so the aggregate is bit-identical under any permutation of
//! arrival order. Bounds ([`SumRange`]): |value| × total weight < 2^78 keeps every partial sum
//! below 2^126, so no sum can overflow: model updates take |value| < 2^31 and weights up to
//! 2^47 rows, plain sums (statistics, evaluation counts) |value| < 2^62 from up to 2^16
//! answers of weight 1.
//!
//! `AggregatorKind::Median` needs every answer at once (coordinate-wise median, robust to a few wild
//! updates): it is *non-streaming*, holds one vector per node, and cannot work on masked
//! answers, so spec validation refuses it where secure aggregation is on.
//!
//! Memory: one `i128` per parameter for the running sum, whatever the number of nodes. An
//! update is staged (validated as its chunks arrive) and folded once complete, so a node that
//! vanishes mid-stream, or sends a NaN in its last chunk, leaves no trace in the sum.

use crate::{Error, Result};
use fedstat_proto::wire::DType;

/// Fractional bits of the fixed-point representation (resolution 3.6e-15).
pub const FRAC_BITS: u32 = 48;
/// Largest accepted model parameter magnitude (2^31). A larger one means training diverged.
pub const MAX_ABS_PARAM: f64 = 2_147_483_648.0;
/// Largest total weight (training rows) of one weighted mean (2^47, about 1.4e14 rows).
pub const MAX_TOTAL_WEIGHT: u64 = 1 << 47;
/// Largest magnitude of any value on the wire (2^62): what [`Staging`] lets through. Each
/// aggregate then checks its own, usually tighter, [`SumRange`].
pub const MAX_ABS_VALUE: f64 = 4_611_686_018_427_387_904.0;

/// The values and weights one [`ExactSum`] accepts. `max_abs × max_total_weight` must stay
/// at or below 2^78 (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SumRange {
    /// Every value's magnitude is below this.
    pub max_abs: f64,
    /// The weights of all answers add up to at most this.
    pub max_total_weight: u64,
}

impl SumRange {
    /// Model updates averaged by rows: |parameter| < 2^31, up to 2^47 rows.
    pub const MEAN: SumRange = SumRange {
        max_abs: MAX_ABS_PARAM,
        max_total_weight: MAX_TOTAL_WEIGHT,
    };
    /// Plain sums (weight 1 per answer): |value| < 2^62 from up to 2^16 answers.
    pub const SUM: SumRange = SumRange {
        max_abs: MAX_ABS_VALUE,
        max_total_weight: 1 << 16,
    };
}

const SCALE: f64 = (1u64 << FRAC_BITS) as f64;

/// Parameters in the precision they travel in.
#[derive(Debug, Clone, PartialEq)]
pub enum Values {
    F32(Vec<f32>),
    F64(Vec<f64>),
}

impl Values {
    pub fn zeros(dtype: DType, len: usize) -> Self {
        match dtype {
            DType::F32 => Values::F32(vec![0.0; len]),
            DType::F64 => Values::F64(vec![0.0; len]),
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Values::F32(v) => v.len(),
            Values::F64(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn dtype(&self) -> DType {
        match self {
            Values::F32(_) => DType::F32,
            Values::F64(_) => DType::F64,
        }
    }

    /// Little-endian bytes, as they travel.
    pub fn to_le_bytes(&self) -> Vec<u8> {
        // Sized once and filled in fixed-width pieces (a plain copy on little-endian targets);
        // `flat_map().collect()` cannot know the length and pushed byte by byte.
        fn fill<const N: usize, T: Copy>(v: &[T], bytes: impl Fn(T) -> [u8; N]) -> Vec<u8> {
            let mut out = vec![0u8; v.len() * N];
            for (o, &x) in out.chunks_exact_mut(N).zip(v) {
                o.copy_from_slice(&bytes(x));
            }
            out
        }
        match self {
            Values::F32(v) => fill(v, f32::to_le_bytes),
            Values::F64(v) => fill(v, f64::to_le_bytes),
        }
    }

    pub fn to_f64(&self) -> Vec<f64> {
        match self {
            Values::F32(v) => v.iter().map(|&x| x as f64).collect(),
            Values::F64(v) => v.clone(),
        }
    }

    /// Build from f64 in the given precision.
    pub fn from_f64(values: &[f64], dtype: DType) -> Self {
        match dtype {
            DType::F32 => Values::F32(values.iter().map(|&x| x as f32).collect()),
            DType::F64 => Values::F64(values.to_vec()),
        }
    }
}

/// Receives one tensor's little-endian bytes in arbitrary pieces (as QUIC delivers them),
/// checking every value as it arrives.
#[derive(Debug)]
pub struct Staging {
    values: Values,
    filled: usize,
    carry: [u8; 8],
    carry_len: usize,
}

impl Staging {
    pub fn new(dtype: DType, len: usize) -> Self {
        let values = match dtype {
            DType::F32 => Values::F32(Vec::with_capacity(len)),
            DType::F64 => Values::F64(Vec::with_capacity(len)),
        };
        Staging {
            values,
            filled: 0,
            carry: [0; 8],
            carry_len: 0,
        }
    }

    fn expected(&self) -> usize {
        match &self.values {
            Values::F32(v) => v.capacity(),
            Values::F64(v) => v.capacity(),
        }
    }

    /// Append a piece of the stream. Fails on the first non-finite or out-of-range value,
    /// naming its index (never its value), or when more bytes arrive than announced.
    pub fn push(&mut self, mut bytes: &[u8]) -> Result<()> {
        let size = self.values.dtype().size();
        if self.carry_len > 0 {
            let take = (size - self.carry_len).min(bytes.len());
            self.carry[self.carry_len..self.carry_len + take].copy_from_slice(&bytes[..take]);
            self.carry_len += take;
            bytes = &bytes[take..];
            if self.carry_len < size {
                return Ok(());
            }
            let one = self.carry;
            self.carry_len = 0;
            self.push_whole(&one[..size])?;
        }
        let whole = bytes.len() / size * size;
        self.push_whole(&bytes[..whole])?;
        let rest = &bytes[whole..];
        self.carry[..rest.len()].copy_from_slice(rest);
        self.carry_len = rest.len();
        Ok(())
    }

    fn push_whole(&mut self, bytes: &[u8]) -> Result<()> {
        let size = self.values.dtype().size();
        let count = bytes.len() / size;
        if self.filled + count > self.expected() {
            return Err(Error::Rejected(format!(
                "more than the announced {} parameters were sent",
                self.expected()
            )));
        }
        let start = self.filled;
        let bad = |i: usize| {
            Error::Rejected(format!(
                "value {} is not finite or exceeds 2^62 in magnitude",
                start + i
            ))
        };
        // Decode the piece into the reserved buffer, then check it in one vectorisable pass;
        // a bad piece is cut off again (the staging is dropped on error anyway).
        let bad_at = match &mut self.values {
            Values::F32(v) => {
                v.extend(
                    bytes
                        .chunks_exact(4)
                        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
                );
                let at = first_out_of_range_f32(&v[start..], MAX_ABS_VALUE);
                if at.is_some() {
                    v.truncate(start);
                }
                at
            }
            Values::F64(v) => {
                v.extend(
                    bytes
                        .chunks_exact(8)
                        .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]])),
                );
                let at = first_out_of_range_f64(&v[start..], MAX_ABS_VALUE);
                if at.is_some() {
                    v.truncate(start);
                }
                at
            }
        };
        if let Some(i) = bad_at {
            return Err(bad(i));
        }
        self.filled += count;
        Ok(())
    }

    /// The complete tensor, or an error if bytes are missing.
    pub fn finish(self) -> Result<Values> {
        if self.filled != self.expected() || self.carry_len != 0 {
            return Err(Error::Rejected(format!(
                "stream ended after {} of {} parameters",
                self.filled,
                self.expected()
            )));
        }
        Ok(self.values)
    }
}

/// Finite and below `max_abs` in magnitude (false for NaN).
#[inline(always)]
fn in_range(x: f64, max_abs: f64) -> bool {
    x.abs() < max_abs
}

/// Values checked per block without an early exit, so the check vectorises; the exact index
/// is looked for only in a block that failed.
const CHECK_BLOCK: usize = 4096;

/// Index of the first value that is not finite or not below `max_abs` in magnitude.
fn first_out_of_range_f32(v: &[f32], max_abs: f64) -> Option<usize> {
    // The bounds are powers of two, exact in f32, and f32 -> f64 is exact, so this is
    // `in_range(x as f64, max_abs)`.
    let max_abs = max_abs as f32;
    let fits = |x: &f32| x.abs() < max_abs;
    v.chunks(CHECK_BLOCK).enumerate().find_map(|(b, block)| {
        let ok = block.iter().fold(true, |ok, x| ok & fits(x));
        (!ok).then(|| b * CHECK_BLOCK + block.iter().position(|x| !fits(x)).unwrap_or(0))
    })
}

/// As [`first_out_of_range_f32`], for f64.
fn first_out_of_range_f64(v: &[f64], max_abs: f64) -> Option<usize> {
    v.chunks(CHECK_BLOCK).enumerate().find_map(|(b, block)| {
        let ok = block.iter().fold(true, |ok, &x| ok & in_range(x, max_abs));
        (!ok).then(|| b * CHECK_BLOCK + block.iter().position(|&x| !in_range(x, max_abs)).unwrap_or(0))
    })
}

/// Check a complete answer against a range before it is folded.
pub fn validate(values: &Values, max_abs: f64) -> Result<()> {
    let at = match values {
        Values::F32(v) => first_out_of_range_f32(v, max_abs),
        Values::F64(v) => first_out_of_range_f64(v, max_abs),
    };
    match at {
        Some(i) => Err(Error::Rejected(format!(
            "value {i} is not finite or exceeds {max_abs:e} in magnitude"
        ))),
        None => Ok(()),
    }
}

/// The running exact weighted sum of a step's answers (see the module docs).
#[derive(Debug, Clone)]
pub struct ExactSum {
    dtype: DType,
    range: SumRange,
    acc: Vec<i128>,
    total_weight: u64,
    count: usize,
}

impl ExactSum {
    /// A weighted sum of model updates ([`SumRange::MEAN`]).
    pub fn new(dtype: DType, len: usize) -> Self {
        ExactSum::with_range(dtype, len, SumRange::MEAN)
    }

    /// A sum accepting `range`. A range beyond the module's bound is clamped to it.
    pub fn with_range(dtype: DType, len: usize, range: SumRange) -> Self {
        let range = SumRange {
            max_abs: range.max_abs.min(MAX_ABS_VALUE),
            max_total_weight: range.max_total_weight.min(MAX_TOTAL_WEIGHT),
        };
        ExactSum {
            dtype,
            range,
            acc: vec![0; len],
            total_weight: 0,
            count: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.acc.len()
    }

    pub fn is_empty(&self) -> bool {
        self.acc.is_empty()
    }

    /// Number of updates folded in.
    pub fn count(&self) -> usize {
        self.count
    }

    pub fn total_weight(&self) -> u64 {
        self.total_weight
    }

    /// Fold one validated update with its weight (training rows). Checks shape, precision,
    /// weight and every value before touching the sum, so a rejected update leaves no trace.
    pub fn fold(&mut self, values: &Values, weight: u64) -> Result<()> {
        if values.len() != self.acc.len() {
            return Err(Error::Rejected(format!(
                "wrong shape: {} parameters, the model has {}",
                values.len(),
                self.acc.len()
            )));
        }
        if values.dtype() != self.dtype {
            return Err(Error::Rejected(format!(
                "wrong precision: {:?}, the model is {:?}",
                values.dtype(),
                self.dtype
            )));
        }
        if weight == 0 {
            return Err(Error::Rejected("update trained on zero rows".into()));
        }
        let limit = self.range.max_total_weight;
        let total = self
            .total_weight
            .checked_add(weight)
            .filter(|t| *t <= limit)
            .ok_or_else(|| Error::Rejected(format!("total weight exceeds the limit of {limit}")))?;
        validate(values, self.range.max_abs)?;
        match values {
            Values::F32(v) => fold_into(&mut self.acc, v.iter().map(|&x| x as f64), weight),
            Values::F64(v) => fold_into(&mut self.acc, v.iter().copied(), weight),
        }
        self.total_weight = total;
        self.count += 1;
        Ok(())
    }

    /// The exact sum, rounded once to f64 per value.
    pub fn sum(&self) -> Vec<f64> {
        self.acc.iter().map(|&s| i128_to_f64(s) / SCALE).collect()
    }

    /// The weighted average, in the answers' precision.
    pub fn average(&self) -> Result<Values> {
        if self.total_weight == 0 {
            return Err(Error::Rejected("no update to average".into()));
        }
        let denom = self.total_weight as f64 * SCALE;
        let mean = self.acc.iter().map(|&s| i128_to_f64(s) / denom);
        Ok(match self.dtype {
            DType::F32 => Values::F32(mean.map(|x| x as f32).collect()),
            DType::F64 => Values::F64(mean.collect()),
        })
    }
}

/// How a step combines its answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AggregatorKind {
    /// The exact sum of the answers (each of weight 1): statistics, evaluation counts.
    Sum,
    /// The exact weighted mean: model updates weighted by their rows.
    Mean,
    /// The coordinate-wise median of the answers: robust to a few wild updates, but it must
    /// hold every answer at once.
    Median,
}

impl AggregatorKind {
    /// How the answers to `phase` combine: model updates by their weighted mean, every other
    /// answer by its sum. The algorithms' steps and a node encoding a masked answer use this.
    pub fn of_phase(phase: fedstat_proto::wire::Phase) -> Self {
        match phase {
            fedstat_proto::wire::Phase::Train => AggregatorKind::Mean,
            _ => AggregatorKind::Sum,
        }
    }

    /// Whether the aggregate can be folded one answer at a time, never holding an individual
    /// answer after it is folded. Only streaming aggregators work on masked answers (secure
    /// aggregation reveals nothing but the sum).
    pub fn is_streaming(self) -> bool {
        !matches!(self, AggregatorKind::Median)
    }

    /// The range of values and weights this aggregate accepts.
    pub fn range(self) -> SumRange {
        match self {
            AggregatorKind::Sum => SumRange::SUM,
            AggregatorKind::Mean | AggregatorKind::Median => SumRange::MEAN,
        }
    }

    /// A fresh aggregate for answers of `len` values of `dtype` with `aux` side figures.
    pub fn start(self, dtype: DType, len: usize, aux: usize) -> Box<dyn Aggregator> {
        let range = self.range();
        let aux = ExactSum::with_range(DType::F64, aux, range);
        match self {
            AggregatorKind::Sum | AggregatorKind::Mean => Box::new(Streaming {
                kind: self,
                values: ExactSum::with_range(dtype, len, range),
                aux,
            }),
            AggregatorKind::Median => Box::new(Median {
                dtype,
                len,
                answers: Vec::new(),
                aux,
            }),
        }
    }
}

/// What the answers to one step pooled into.
#[derive(Debug, Clone, PartialEq)]
pub struct Pooled {
    /// The aggregate: the sum (`Sum`, in f64), the weighted mean or the median (in the
    /// answers' precision).
    pub values: Values,
    /// The side figures: summed like `values` (`Sum`), or their weighted mean.
    pub aux: Vec<f64>,
    pub total_weight: u64,
    pub answers: usize,
}

/// One step's aggregate, fed one validated answer at a time.
pub trait Aggregator: std::fmt::Debug + Send {
    /// Fold one answer with its weight and side figures. Checks everything before touching
    /// the aggregate, so a rejected answer leaves no trace.
    fn fold(&mut self, values: &Values, weight: u64, aux: &[f64]) -> Result<()>;
    /// The pooled result; fails when no answer was folded.
    fn finish(self: Box<Self>) -> Result<Pooled>;
}

#[derive(Debug)]
struct Streaming {
    kind: AggregatorKind,
    values: ExactSum,
    aux: ExactSum,
}

fn check_aux(aux: &ExactSum, given: &[f64], weight: u64) -> Result<()> {
    if given.len() != aux.len() {
        return Err(Error::Rejected(format!(
            "{} side figures, the step has {}",
            given.len(),
            aux.len()
        )));
    }
    // Checked like the values, so the aux fold below cannot fail after the values'.
    validate(&Values::F64(given.to_vec()), aux.range.max_abs)?;
    if aux
        .total_weight
        .checked_add(weight)
        .is_none_or(|t| t > aux.range.max_total_weight)
    {
        return Err(Error::Rejected("total weight exceeds its limit".into()));
    }
    Ok(())
}

impl Aggregator for Streaming {
    fn fold(&mut self, values: &Values, weight: u64, aux: &[f64]) -> Result<()> {
        check_aux(&self.aux, aux, weight)?;
        self.values.fold(values, weight)?;
        self.aux.fold(&Values::F64(aux.to_vec()), weight)
    }

    fn finish(self: Box<Self>) -> Result<Pooled> {
        pool(self.kind, &self.values, &self.aux)
    }
}

/// The pooled result of exact sums of values and side figures (see [`Streaming`]).
fn pool(kind: AggregatorKind, values: &ExactSum, aux: &ExactSum) -> Result<Pooled> {
    let (pooled, side) = match kind {
        AggregatorKind::Sum => (Values::F64(values.sum()), aux.sum()),
        _ => (
            values.average()?,
            if aux.is_empty() {
                Vec::new()
            } else {
                aux.average()?.to_f64()
            },
        ),
    };
    if values.count() == 0 {
        return Err(Error::Rejected("no answer to pool".into()));
    }
    Ok(Pooled {
        values: pooled,
        aux: side,
        total_weight: values.total_weight(),
        answers: values.count(),
    })
}

/// Bytes of one element of secure aggregation's ring, `Z mod 2^128`.
pub const RING_BYTES: usize = 16;

/// Secure aggregation's encoding of one answer: exactly the integer terms [`ExactSum`] would
/// add for it, as little-endian elements of `Z mod 2^128`: `trunc(x · 2^48) · weight` for each
/// value, then the weight itself, then each side figure like the values. The same range checks
/// as [`Aggregator::fold`] run here, at the node, because the coordinator never sees the
/// answer. Since no partial sum of an `ExactSum` reaches 2^126 in magnitude, the sum of these
/// elements mod 2^128 *is* the exact integer sum, and [`pooled_from_ring`] turns it into the
/// same [`Pooled`] bit for bit as the plain fold of the same answers.
pub fn encode_ring(kind: AggregatorKind, values: &Values, weight: u64, aux: &[f64]) -> Result<Vec<u8>> {
    if !kind.is_streaming() {
        return Err(Error::Rejected(
            "the median cannot be computed under secure aggregation".into(),
        ));
    }
    let range = kind.range();
    let weight_ok = match kind {
        AggregatorKind::Sum => weight == 1,
        _ => weight >= 1,
    };
    if !weight_ok || weight > range.max_total_weight.min(MAX_TOTAL_WEIGHT) {
        return Err(Error::Rejected(format!(
            "answer of weight {weight} for a {kind:?}"
        )));
    }
    validate(values, range.max_abs.min(MAX_ABS_VALUE))?;
    validate(&Values::F64(aux.to_vec()), range.max_abs.min(MAX_ABS_VALUE))?;
    let mut out = Vec::with_capacity((values.len() + 1 + aux.len()) * RING_BYTES);
    let mut put = |x: i128| out.extend_from_slice(&(x as u128).to_le_bytes());
    match values {
        Values::F32(v) => v.iter().for_each(|&x| put(weighted_fixed(f64::from(x), weight))),
        Values::F64(v) => v.iter().for_each(|&x| put(weighted_fixed(x, weight))),
    }
    put(i128::from(weight));
    aux.iter().for_each(|&a| put(weighted_fixed(a, weight)));
    Ok(out)
}

/// The pooled result of a secure sum: `sum` is the unmasked ring sum of `answers` answers
/// encoded by [`encode_ring`] (`len` values of `dtype`, then the weight, then `aux` side
/// figures). Fails when the sum cannot be one of well-formed answers (a node encoded values
/// outside the step's range or a wrong weight): the step then fails rather than publish it.
pub fn pooled_from_ring(
    kind: AggregatorKind,
    dtype: DType,
    len: usize,
    aux: usize,
    sum: &[u8],
    answers: usize,
) -> Result<Pooled> {
    if sum.len() != (len + 1 + aux) * RING_BYTES {
        return Err(Error::Rejected(format!(
            "the secure sum has {} bytes, the step expects {}",
            sum.len(),
            (len + 1 + aux) * RING_BYTES
        )));
    }
    let mut elements = sum
        .chunks_exact(RING_BYTES)
        .map(|c| u128::from_le_bytes(c.try_into().unwrap_or([0; RING_BYTES])) as i128);
    let values: Vec<i128> = elements.by_ref().take(len).collect();
    let weight = elements.next().unwrap_or(0);
    let side: Vec<i128> = elements.collect();
    let range = kind.range();
    let limit = range.max_total_weight.min(MAX_TOTAL_WEIGHT);
    let weight_ok = match kind {
        AggregatorKind::Sum => weight == answers as i128,
        _ => weight >= answers as i128 && weight <= i128::from(limit),
    };
    if answers == 0 || !weight_ok {
        return Err(Error::Rejected(
            "the secure sum's total weight is not that of well-formed answers".into(),
        ));
    }
    let total_weight = weight as u64;
    // What every plain fold guarantees: |value| < max_abs for each answer, so the sum's
    // magnitude stays below max_abs · 2^48 · total weight.
    let bound = (range.max_abs.min(MAX_ABS_VALUE) * SCALE) as i128 * i128::from(total_weight);
    if values
        .iter()
        .chain(&side)
        .any(|s| s.unsigned_abs() > bound.unsigned_abs())
    {
        return Err(Error::Rejected(
            "the secure sum is out of the step's range: an answer was outside it".into(),
        ));
    }
    let sum_of = |dtype: DType, acc: Vec<i128>| ExactSum {
        dtype,
        range,
        acc,
        total_weight,
        count: answers,
    };
    pool(kind, &sum_of(dtype, values), &sum_of(DType::F64, side))
}

/// Coordinate-wise median of the answers (the mean of the two middle ones for an even count),
/// computed after sorting, so arrival order does not matter. Non-streaming: it holds every
/// answer until the step closes.
#[derive(Debug)]
struct Median {
    dtype: DType,
    len: usize,
    answers: Vec<Vec<f64>>,
    aux: ExactSum,
}

impl Aggregator for Median {
    fn fold(&mut self, values: &Values, weight: u64, aux: &[f64]) -> Result<()> {
        if values.len() != self.len || values.dtype() != self.dtype {
            return Err(Error::Rejected(format!(
                "wrong shape: {} {:?} values, the step expects {} {:?}",
                values.len(),
                values.dtype(),
                self.len,
                self.dtype
            )));
        }
        if weight == 0 {
            return Err(Error::Rejected("answer of weight zero".into()));
        }
        check_aux(&self.aux, aux, weight)?;
        validate(values, MAX_ABS_PARAM)?;
        self.aux.fold(&Values::F64(aux.to_vec()), weight)?;
        self.answers.push(values.to_f64());
        Ok(())
    }

    fn finish(self: Box<Self>) -> Result<Pooled> {
        let n = self.answers.len();
        if n == 0 {
            return Err(Error::Rejected("no answer to pool".into()));
        }
        let mut column = vec![0.0; n];
        let median: Vec<f64> = (0..self.len)
            .map(|j| {
                for (c, a) in column.iter_mut().zip(&self.answers) {
                    *c = a[j];
                }
                column.sort_by(f64::total_cmp);
                if n % 2 == 1 {
                    column[n / 2]
                } else {
                    (column[n / 2 - 1] + column[n / 2]) / 2.0
                }
            })
            .collect();
        Ok(Pooled {
            values: Values::from_f64(&median, self.dtype),
            aux: if self.aux.is_empty() {
                Vec::new()
            } else {
                self.aux.average()?.to_f64()
            },
            total_weight: self.aux.total_weight(),
            answers: n,
        })
    }
}

/// `s as f64`, bit for bit, without the software `i128` conversion when `s` fits in an `i64`
/// (sums of parameters below 2^15 in magnitude do): both casts round to nearest, ties to even.
#[inline(always)]
fn i128_to_f64(s: i128) -> f64 {
    match i64::try_from(s) {
        Ok(small) => small as f64,
        Err(_) => s as f64,
    }
}

#[inline]
fn fold_into(acc: &mut [i128], values: impl Iterator<Item = f64>, weight: u64) {
    for (a, x) in acc.iter_mut().zip(values) {
        *a += weighted_fixed(x, weight);
    }
}

/// `trunc(x * 2^48) * weight`, exactly, for |x| < 2^31 and weight < 2^47, in integer
/// arithmetic only: x is `mant * 2^(exp - 1075)`, so its fixed-point value is `mant` shifted by
/// `exp - 1075 + 48`. A right shift drops the fraction of the magnitude (truncation toward
/// zero); a left shift is exact, and applied after the multiplication it keeps the product
/// below 2^126. The sign is applied without a branch, as signs of updates are random.
/// (The float route, `trunc` then two float-to-int conversions, calls libm's `trunc` on the
/// baseline x86-64 target and ran 2-3 times slower.)
#[inline(always)]
fn weighted_fixed(x: f64, weight: u64) -> i128 {
    let bits = x.to_bits();
    let exp = ((bits >> 52) & 0x7ff) as i32;
    let frac = bits & ((1 << 52) - 1);
    // Subnormals have no implicit leading bit and the exponent of the smallest normals.
    let (mant, exp) = if exp == 0 {
        (frac, 1)
    } else {
        (frac | 1 << 52, exp)
    };
    let shift = exp - 1075 + FRAC_BITS as i32;
    let magnitude = if shift >= 0 {
        (u128::from(mant) * u128::from(weight)) << shift
    } else {
        u128::from(mant.checked_shr(shift.unsigned_abs()).unwrap_or(0)) * u128::from(weight)
    };
    let sign = ((bits as i64) >> 63) as i128; // 0 or -1
    ((magnitude as i128) ^ sign) - sign
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn average(updates: &[(Vec<f64>, u64)]) -> Vec<f64> {
        let mut agg = ExactSum::new(DType::F64, updates[0].0.len());
        for (v, w) in updates {
            agg.fold(&Values::F64(v.clone()), *w).expect("fold");
        }
        agg.average().expect("average").to_f64()
    }

    proptest! {
        #[test]
        fn order_does_not_change_a_bit(
            updates in prop::collection::vec((prop::collection::vec(-1e6f64..1e6, 16), 1u64..100_000), 1..8),
            seed in any::<u64>(),
        ) {
            let forward = average(&updates);
            let mut shuffled = updates.clone();
            // A seeded Fisher-Yates shuffle: any permutation must give the same bits.
            let mut s = seed;
            for i in (1..shuffled.len()).rev() {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                shuffled.swap(i, (s >> 33) as usize % (i + 1));
            }
            let back = average(&shuffled);
            prop_assert_eq!(
                forward.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                back.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
            );
        }

        #[test]
        fn average_of_identical_models_is_that_model(
            model in prop::collection::vec(-1e3f64..1e3, 1..32),
            weights in prop::collection::vec(1u64..1_000_000, 1..10),
        ) {
            let updates: Vec<_> = weights.iter().map(|&w| (model.clone(), w)).collect();
            for (got, want) in average(&updates).iter().zip(&model) {
                prop_assert!((got - want).abs() <= 1e-12 * want.abs().max(1.0), "{got} vs {want}");
            }
        }

        #[test]
        fn the_ring_sum_of_encoded_answers_pools_like_the_plain_fold(
            answers in prop::collection::vec((prop::collection::vec(-1e6f64..1e6, 8), 1u64..100_000, prop::collection::vec(-1e3f64..1e3, 2)), 1..6),
            mean in any::<bool>(),
            f32s in any::<bool>(),
        ) {
            let kind = if mean { AggregatorKind::Mean } else { AggregatorKind::Sum };
            let dtype = if f32s { DType::F32 } else { DType::F64 };
            let mut plain = kind.start(dtype, 8, 2);
            let mut ring = [0u128; 8 + 1 + 2];
            for (v, w, aux) in &answers {
                let w = if mean { *w } else { 1 };
                let values = Values::from_f64(v, dtype);
                plain.fold(&values, w, aux).expect("fold");
                let bytes = encode_ring(kind, &values, w, aux).expect("encode");
                for (acc, c) in ring.iter_mut().zip(bytes.chunks_exact(RING_BYTES)) {
                    *acc = acc.wrapping_add(u128::from_le_bytes(c.try_into().expect("16 bytes")));
                }
            }
            let sum: Vec<u8> = ring.iter().flat_map(|x| x.to_le_bytes()).collect();
            let secure = pooled_from_ring(kind, dtype, 8, 2, &sum, answers.len()).expect("pool");
            let plain = plain.finish().expect("finish");
            prop_assert_eq!(secure.total_weight, plain.total_weight);
            prop_assert_eq!(secure.answers, plain.answers);
            prop_assert_eq!(secure.values.to_le_bytes(), plain.values.to_le_bytes());
            prop_assert_eq!(
                secure.aux.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                plain.aux.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
            );
        }

        #[test]
        fn staging_accepts_any_split(values in prop::collection::vec(-1e9f64..1e9, 0..50), cuts in prop::collection::vec(0usize..400, 0..6)) {
            let bytes = Values::F64(values.clone()).to_le_bytes();
            let mut cuts = cuts.into_iter().map(|c| c.min(bytes.len())).collect::<Vec<_>>();
            cuts.push(0);
            cuts.push(bytes.len());
            cuts.sort_unstable();
            let mut st = Staging::new(DType::F64, values.len());
            for w in cuts.windows(2) {
                st.push(&bytes[w[0]..w[1]]).expect("push");
            }
            prop_assert_eq!(st.finish().expect("finish"), Values::F64(values));
        }
    }

    #[test]
    fn integer_fixed_point_matches_the_definition() {
        let mut s = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        let check = |x: f64, w: u64| {
            let want = (x * SCALE) as i128 * i128::from(w);
            assert_eq!(weighted_fixed(x, w), want, "x = {x:e}, weight {w}");
        };
        for i in 0..200_000 {
            let r = next();
            // Every exponent from subnormal up to 2^31, both signs, any mantissa.
            let exp = (r >> 52) % (1023 + 31);
            let x = f64::from_bits((r & !(0x7ff << 52)) | exp << 52);
            let x = if i % 3 == 0 { f64::from(x as f32) } else { x };
            let w = (next() >> 17).max(1); // below 2^47
            check(x, w);
            check(x, 1);
        }
        for x in [
            0.0,
            -0.0,
            f64::MIN_POSITIVE,
            -5e-324,
            1.0,
            -1.0,
            0.5,
            2_147_483_647.75,
        ] {
            check(x, MAX_TOTAL_WEIGHT - 1);
            check(-x, 100);
        }
    }

    #[test]
    fn the_i64_shortcut_converts_like_the_i128_cast() {
        let edges = [
            0,
            1,
            -1,
            i64::MAX as i128,
            i64::MIN as i128,
            i64::MAX as i128 + 1,
            i64::MIN as i128 - 1,
        ];
        let mut s = 0x2545_f491_4f6c_dd1du64;
        let randoms = (0..100_000).map(|i| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            // Magnitudes around 2^53 (where rounding starts), 2^63 and 2^126.
            let r = i128::from(s as i64);
            [r >> 10, r, r << 62][i % 3]
        });
        for x in edges.into_iter().chain(randoms) {
            assert_eq!(i128_to_f64(x).to_bits(), (x as f64).to_bits(), "{x}");
        }
    }

    #[test]
    fn a_bad_value_is_named_by_its_index_in_any_block() {
        for at in [
            0,
            1,
            CHECK_BLOCK - 1,
            CHECK_BLOCK,
            3 * CHECK_BLOCK + 7,
            5 * CHECK_BLOCK - 1,
        ] {
            for bad in [f64::NAN, f64::NEG_INFINITY, -MAX_ABS_VALUE] {
                let mut v = vec![0.5; 5 * CHECK_BLOCK];
                v[at] = bad;
                let want = format!("value {at} ");
                let err = validate(&Values::F64(v.clone()), MAX_ABS_PARAM)
                    .expect_err("f64")
                    .to_string();
                assert!(err.contains(&want), "{err}");
                let v32 = Values::from_f64(&v, DType::F32);
                let err = validate(&v32, MAX_ABS_PARAM).expect_err("f32").to_string();
                assert!(err.contains(&want), "{err}");
                let mut st = Staging::new(DType::F32, v.len());
                let err = st.push(&v32.to_le_bytes()).expect_err("staging").to_string();
                assert!(err.contains(&want), "{err}");
            }
        }
        let mut st = Staging::new(DType::F32, 2);
        st.push(&[0, 0, 0x80, 0x3f, 0xff]).expect("1.0 and a byte");
        let err = st.push(&[0xff, 0x7f, 0xff]).expect_err("nan second").to_string();
        assert!(err.contains("value 1 "), "{err}");
    }

    #[test]
    fn weighted_average_is_right() {
        let got = average(&[(vec![1.0, -2.0], 1), (vec![4.0, 2.0], 3)]);
        assert_eq!(got, vec![3.25, 1.0]);
    }

    #[test]
    fn bad_updates_leave_no_trace() {
        let mut agg = ExactSum::new(DType::F64, 3);
        agg.fold(&Values::F64(vec![1.0, 2.0, 3.0]), 10).expect("fold");
        let before = agg.acc.clone();
        let check = |agg: &mut ExactSum, v: Values, w: u64, needle: &str| {
            let err = agg.fold(&v, w).expect_err("must be rejected").to_string();
            assert!(err.contains(needle), "{err} should mention {needle}");
        };
        check(&mut agg, Values::F64(vec![1.0, 2.0]), 5, "wrong shape");
        check(&mut agg, Values::F64(vec![1.0, f64::NAN, 3.0]), 5, "value 1");
        check(&mut agg, Values::F64(vec![1.0, 2.0, f64::INFINITY]), 5, "value 2");
        check(&mut agg, Values::F64(vec![1e300, 2.0, 3.0]), 5, "value 0");
        check(&mut agg, Values::F32(vec![1.0, 2.0, 3.0]), 5, "precision");
        check(&mut agg, Values::F64(vec![1.0, 2.0, 3.0]), 0, "zero rows");
        check(
            &mut agg,
            Values::F64(vec![1.0, 2.0, 3.0]),
            MAX_TOTAL_WEIGHT,
            "limit",
        );
        assert_eq!(agg.acc, before);
        assert_eq!(agg.count(), 1);
    }

    #[test]
    fn staging_rejects_bad_streams() {
        let mut st = Staging::new(DType::F32, 2);
        let err = st.push(&f32::NAN.to_le_bytes()).expect_err("nan");
        assert!(err.to_string().contains("value 0"), "{err}");

        let mut st = Staging::new(DType::F32, 1);
        st.push(&[0, 0]).expect("half a value is fine so far");
        assert!(st.finish().is_err());

        let mut st = Staging::new(DType::F32, 1);
        let err = st.push(&[0; 8]).expect_err("too many");
        assert!(err.to_string().contains("more than"), "{err}");
    }

    #[test]
    fn the_median_holds_every_answer_and_ignores_order() {
        assert!(AggregatorKind::Sum.is_streaming() && AggregatorKind::Mean.is_streaming());
        assert!(!AggregatorKind::Median.is_streaming());
        let answers = [vec![1.0, 10.0], vec![3.0, -5.0], vec![2.0, 1e6], vec![4.0, 0.0]];
        let pool = |order: &[usize]| {
            let mut agg = AggregatorKind::Median.start(DType::F64, 2, 1);
            for &i in order {
                agg.fold(&Values::F64(answers[i].clone()), 10, &[i as f64])
                    .expect("fold");
            }
            agg.finish().expect("pooled")
        };
        let a = pool(&[0, 1, 2, 3]);
        assert_eq!(
            a.values,
            Values::F64(vec![2.5, 5.0]),
            "one wild value moves nothing"
        );
        assert_eq!(a.aux, vec![1.5]);
        assert_eq!((a.total_weight, a.answers), (40, 4));
        assert_eq!(pool(&[3, 1, 0, 2]), a);
        let mut agg = AggregatorKind::Median.start(DType::F64, 2, 0);
        assert!(agg.fold(&Values::F64(vec![1.0]), 1, &[]).is_err(), "wrong shape");
        assert!(agg.finish().is_err(), "nothing to pool");
    }

    #[test]
    fn plain_sums_take_large_values_and_means_do_not() {
        let big = Values::F64(vec![3.0e12, -1.0]);
        let mut sum = AggregatorKind::Sum.start(DType::F64, 2, 0);
        sum.fold(&big, 1, &[]).expect("a sum of squares of wages fits");
        sum.fold(&Values::F64(vec![1.0, 0.25]), 1, &[]).expect("fold");
        let pooled = sum.finish().expect("pooled");
        assert_eq!(pooled.values, Values::F64(vec![3.0e12 + 1.0, -0.75]));
        let mut mean = AggregatorKind::Mean.start(DType::F64, 2, 0);
        assert!(
            mean.fold(&big, 1, &[]).is_err(),
            "a parameter of 3e12 means divergence"
        );
    }
}
