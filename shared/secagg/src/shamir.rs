//! Shamir secret sharing over the scalar field of curve25519 (dalek's `Scalar`), and the one
//! byte encoding of a share: `x` (u32, little-endian) then the 32-byte canonical scalar.
//!
//! Share `i` of a member is the polynomial's value at its 1-based position in the name-sorted
//! roster, so `x` is never 0 (the secret) and positions are distinct.

use curve25519_dalek::Scalar;
use rand::{CryptoRng, RngCore};
use zeroize::Zeroizing;

/// Bytes of an encoded share.
pub(crate) const SHARE_LEN: usize = 4 + 32;

/// A uniformly random scalar: 64 random bytes reduced mod the group order (bias 2^-259).
pub(crate) fn random_scalar<R: RngCore + CryptoRng>(rng: &mut R) -> Zeroizing<Scalar> {
    let mut wide = Zeroizing::new([0u8; 64]);
    rng.fill_bytes(wide.as_mut());
    Zeroizing::new(Scalar::from_bytes_mod_order_wide(&wide))
}

/// Shares at x = 1..=n of `secret` with threshold `t` (a random polynomial of degree t - 1).
pub(crate) fn split<R: RngCore + CryptoRng>(
    secret: &Scalar,
    t: u32,
    n: u32,
    rng: &mut R,
) -> Vec<Zeroizing<Scalar>> {
    let mut coefficients: Vec<Zeroizing<Scalar>> = vec![Zeroizing::new(*secret)];
    for _ in 1..t {
        coefficients.push(random_scalar(rng));
    }
    (1..=n)
        .map(|x| {
            let x = Scalar::from(u64::from(x));
            // Horner, from the highest coefficient down.
            let mut y = Zeroizing::new(Scalar::ZERO);
            for c in coefficients.iter().rev() {
                *y = *y * x + **c;
            }
            y
        })
        .collect()
}

/// The value at `x` of the polynomial through `points` (distinct, non-zero x; the caller
/// guarantees it by taking x from roster positions).
pub(crate) fn interpolate_at(points: &[(u32, Scalar)], x: u32) -> Scalar {
    let x = Scalar::from(u64::from(x));
    let mut acc = Scalar::ZERO;
    for (i, (xi, yi)) in points.iter().enumerate() {
        let xi = Scalar::from(u64::from(*xi));
        let mut num = Scalar::ONE;
        let mut den = Scalar::ONE;
        for (j, (xj, _)) in points.iter().enumerate() {
            if i != j {
                let xj = Scalar::from(u64::from(*xj));
                num *= x - xj;
                den *= xi - xj;
            }
        }
        acc += *yi * num * den.invert();
    }
    acc
}

/// Why a set of shares does not give a secret.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Rebuild {
    /// Fewer shares than the threshold.
    TooFew,
    /// More than `t` shares that are not on one polynomial of degree `t - 1`.
    Disagree,
}

/// The secret from at least `t` shares. All shares are checked against the polynomial through
/// the first `t`, so a wrong share is detected (and refused) rather than silently used.
pub(crate) fn reconstruct(points: &[(u32, Scalar)], t: u32) -> Result<Zeroizing<Scalar>, Rebuild> {
    let t = t as usize;
    if points.len() < t || t == 0 {
        return Err(Rebuild::TooFew);
    }
    let (base, rest) = points.split_at(t);
    for (x, y) in rest {
        if interpolate_at(base, *x) != *y {
            return Err(Rebuild::Disagree);
        }
    }
    Ok(Zeroizing::new(interpolate_at(base, 0)))
}

pub(crate) fn encode(x: u32, y: &Scalar) -> Vec<u8> {
    let mut out = Vec::with_capacity(SHARE_LEN);
    encode_into(&mut out, x, y);
    out
}

/// Append a share to `out` (a buffer the caller zeroes, when it must not outlive the step).
pub(crate) fn encode_into(out: &mut Vec<u8>, x: u32, y: &Scalar) {
    out.extend_from_slice(&x.to_le_bytes());
    out.extend_from_slice(y.as_bytes());
}

/// Why bytes are not a share.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Decode {
    Length,
    NotCanonical,
}

impl Decode {
    pub(crate) fn problem(&self) -> &'static str {
        match self {
            Decode::Length => "a share is 36 bytes",
            Decode::NotCanonical => "the value is not a canonical scalar",
        }
    }
}

pub(crate) fn decode(bytes: &[u8]) -> Result<(u32, Zeroizing<Scalar>), Decode> {
    if bytes.len() != SHARE_LEN {
        return Err(Decode::Length);
    }
    let mut x = [0u8; 4];
    x.copy_from_slice(&bytes[..4]);
    let mut y = Zeroizing::new([0u8; 32]);
    y.copy_from_slice(&bytes[4..]);
    let y: Option<Scalar> = Scalar::from_canonical_bytes(*y).into();
    let y = y.ok_or(Decode::NotCanonical)?;
    Ok((u32::from_le_bytes(x), Zeroizing::new(y)))
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand_chacha::ChaCha20Rng;

    use super::*;

    fn points(shares: &[Zeroizing<Scalar>], xs: &[u32]) -> Vec<(u32, Scalar)> {
        xs.iter().map(|&x| (x, *shares[x as usize - 1])).collect()
    }

    #[test]
    fn any_t_shares_give_the_secret() {
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        let secret = random_scalar(&mut rng);
        let shares = split(&secret, 3, 5, &mut rng);
        for xs in [[1, 2, 3], [3, 4, 5], [5, 1, 3], [2, 4, 5]] {
            assert_eq!(*reconstruct(&points(&shares, &xs), 3).expect("rebuild"), *secret);
        }
        assert_eq!(
            *reconstruct(&points(&shares, &[1, 2, 3, 4, 5]), 3).expect("all"),
            *secret
        );
    }

    #[test]
    fn fewer_than_t_shares_say_nothing() {
        let mut rng = ChaCha20Rng::seed_from_u64(2);
        let secret = random_scalar(&mut rng);
        let shares = split(&secret, 3, 5, &mut rng);
        assert_eq!(reconstruct(&points(&shares, &[1, 2]), 3), Err(Rebuild::TooFew));
        // Interpolating only two points gives a value unrelated to the secret.
        assert_ne!(interpolate_at(&points(&shares, &[1, 2]), 0), *secret);
    }

    #[test]
    fn a_wrong_share_is_detected() {
        let mut rng = ChaCha20Rng::seed_from_u64(3);
        let secret = random_scalar(&mut rng);
        let shares = split(&secret, 3, 5, &mut rng);
        let mut pts = points(&shares, &[1, 2, 3, 4]);
        pts[3].1 += Scalar::ONE;
        assert_eq!(reconstruct(&pts, 3), Err(Rebuild::Disagree));
    }

    #[test]
    fn encoding_round_trips_and_refuses_garbage() {
        let y = Scalar::from(12345u64);
        let bytes = encode(7, &y);
        let (x, back) = decode(&bytes).expect("decode");
        assert_eq!((x, *back), (7, y));
        assert_eq!(decode(&bytes[..35]).err(), Some(Decode::Length));
        let mut bad = bytes.clone();
        bad[4..].fill(0xff);
        assert_eq!(decode(&bad).err(), Some(Decode::NotCanonical));
    }
}
