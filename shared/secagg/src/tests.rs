//! A simulated federation: N clients and a server, messages moved by hand, dropouts at every
//! step; the unmasked sum must equal the wrapping plain sum bit for bit.

use fedstat_proto::secure::{Ring, SecureRound};
use fedstat_proto::wire::Phase;
use proptest::prelude::*;
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;

use crate::{key_statement, Client, Context, Error, PublicKeys, Server};

fn ctx(ring: Ring, len: u64, threshold: u32) -> Context {
    Context {
        at: SecureRound {
            experiment: 7,
            round: 3,
            phase: Phase::Glm,
            attempt: 0,
        },
        ring,
        len,
        threshold,
    }
}

fn name(i: usize) -> String {
    format!("office-{i:02}")
}

/// Who leaves when.
#[derive(Debug, Default, Clone)]
struct Drops {
    /// Advertised keys, then vanished: not in U2.
    before_sharing: Vec<usize>,
    /// Sent shares, no masked answer: dropped.
    before_masking: Vec<usize>,
    /// Sent a masked answer, no reveal: survivors whose `b` others reveal.
    before_revealing: Vec<usize>,
    /// Masked answers and reveals arrive in reverse name order.
    reversed: bool,
}

struct Federation {
    ctx: Context,
    names: Vec<String>,
    clients: Vec<Client>,
    roster: Vec<(String, PublicKeys)>,
    /// Sealed shares addressed to each member.
    inbox: Vec<Vec<(String, Vec<u8>)>>,
}

impl Federation {
    fn new(ctx: Context, n: usize, seed: u64) -> Federation {
        let names: Vec<String> = (0..n).map(name).collect();
        let mut clients = Vec::new();
        let mut roster = Vec::new();
        for (i, me) in names.iter().enumerate() {
            let mut seed_bytes = [0u8; 32];
            seed_bytes[..8].copy_from_slice(&seed.to_le_bytes());
            seed_bytes[8..16].copy_from_slice(&(i as u64).to_le_bytes());
            let (client, keys) = Client::with_seed(ctx, me, seed_bytes);
            clients.push(client);
            roster.push((me.clone(), keys));
        }
        Federation {
            ctx,
            names,
            clients,
            roster,
            inbox: vec![Vec::new(); n],
        }
    }

    fn share(&mut self, server: &mut Server, who: &[usize]) {
        for &i in who {
            let sealed = self.clients[i]
                .share_keys(self.ctx.threshold, &self.roster)
                .expect("share_keys");
            assert_eq!(sealed.len(), self.names.len() - 1);
            server.shared(&self.names[i]).expect("shared");
            for (to, ciphertext) in sealed {
                let j = self.names.iter().position(|n| *n == to).expect("recipient");
                self.inbox[j].push((self.names[i].clone(), ciphertext));
            }
        }
    }
}

fn random_inputs(ring: Ring, n: usize, len: u64, seed: u64) -> Vec<Vec<u8>> {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let mut v = vec![0u8; len as usize * ring.width()];
            rng.fill_bytes(&mut v);
            v
        })
        .collect()
}

fn plain_sum(ring: Ring, inputs: &[&Vec<u8>], bytes: usize) -> Vec<u8> {
    let mut sum = vec![0u8; bytes];
    for input in inputs {
        crate::prg::add_into(ring, &mut sum, input);
    }
    sum
}

/// One attempt with `drops`; the server's result and the expected sum of the survivors.
fn run(
    ring: Ring,
    n: usize,
    t: u32,
    len: u64,
    drops: &Drops,
    seed: u64,
) -> (Result<Vec<u8>, Error>, Vec<u8>) {
    let ctx = ctx(ring, len, t);
    let inputs = random_inputs(ring, n, len, seed);
    let mut fed = Federation::new(ctx, n, seed);
    let mut server = Server::new(ctx, fed.roster.clone()).expect("server");

    let sharers: Vec<usize> = (0..n).filter(|i| !drops.before_sharing.contains(i)).collect();
    fed.share(&mut server, &sharers);

    let mut maskers: Vec<usize> = sharers
        .iter()
        .copied()
        .filter(|i| !drops.before_masking.contains(i))
        .collect();
    if drops.reversed {
        maskers.reverse();
    }
    for &i in &maskers {
        let received = fed.inbox[i].clone();
        let masked = fed.clients[i]
            .masked_input(&received, &inputs[i])
            .expect("masked_input");
        server.add_masked(&fed.names[i], &masked).expect("add_masked");
    }

    let (survivors, dropped) = server.unmask_sets();
    let mut expected_survivors: Vec<String> = maskers.iter().map(|&i| fed.names[i].clone()).collect();
    expected_survivors.sort();
    assert_eq!(survivors, expected_survivors);
    assert_eq!(dropped.len(), sharers.len() - maskers.len());
    for &i in maskers.iter().filter(|i| !drops.before_revealing.contains(i)) {
        let shares = fed.clients[i].unmask(&survivors, &dropped).expect("unmask");
        assert_eq!(shares.len(), sharers.len());
        server.add_reveal(&fed.names[i], shares).expect("add_reveal");
    }
    let bytes = len as usize * ring.width();
    let expected = plain_sum(
        ring,
        &maskers.iter().map(|&i| &inputs[i]).collect::<Vec<_>>(),
        bytes,
    );
    (server.finish(), expected)
}

fn check_exact(ring: Ring, n: usize, t: u32, len: u64, drops: Drops, seed: u64) {
    let (got, expected) = run(ring, n, t, len, &drops, seed);
    assert!(
        got.as_ref() == Ok(&expected),
        "{ring:?} n={n} t={t} {drops:?}: {:?}",
        got.err()
    );
}

#[test]
fn the_sum_is_exact_for_every_size_and_ring() {
    for ring in [Ring::Z64, Ring::Z128] {
        for n in 3..=10 {
            let t = (n / 2 + 1) as u32;
            check_exact(ring, n, t, 100 + n as u64, Drops::default(), n as u64);
        }
    }
}

#[test]
fn a_node_dropping_after_sharing_is_unmasked_from_its_shares() {
    for ring in [Ring::Z64, Ring::Z128] {
        let drops = Drops {
            before_masking: vec![2],
            ..Drops::default()
        };
        check_exact(ring, 5, 3, 300, drops, 11);
    }
}

#[test]
fn n_minus_t_nodes_may_drop_at_every_step() {
    for ring in [Ring::Z64, Ring::Z128] {
        // n - t drop after sharing.
        let drops = Drops {
            before_masking: vec![0, 3, 6],
            ..Drops::default()
        };
        check_exact(ring, 7, 4, 257, drops, 12);
        // n - t never share.
        let drops = Drops {
            before_sharing: vec![1, 2, 5],
            ..Drops::default()
        };
        check_exact(ring, 7, 4, 257, drops, 13);
        // n - t mask but never reveal: their self-mask seeds come from the others' shares.
        let drops = Drops {
            before_revealing: vec![0, 1, 2],
            ..Drops::default()
        };
        check_exact(ring, 7, 4, 257, drops, 14);
        // A mix: one never shares, two drop before masking, one before revealing.
        let drops = Drops {
            before_sharing: vec![8],
            before_masking: vec![0, 4],
            before_revealing: vec![5],
            reversed: true,
        };
        check_exact(ring, 9, 5, 100, drops, 15);
    }
}

#[test]
fn fewer_than_threshold_reveals_cannot_finish() {
    let drops = Drops {
        before_revealing: vec![0, 1, 2],
        ..Drops::default()
    };
    let (got, _) = run(Ring::Z64, 5, 3, 10, &drops, 16);
    assert_eq!(
        got,
        Err(Error::BelowThreshold {
            have: 2,
            need: 3,
            what: "survivors revealed their shares"
        })
    );
}

/// A federation of `n` whose members have all masked: the state in which `unmask` is asked.
fn masked_federation(n: usize, t: u32) -> (Federation, Server) {
    let ring = Ring::Z64;
    let ctx = ctx(ring, 4, t);
    let mut fed = Federation::new(ctx, n, 21);
    let mut server = Server::new(ctx, fed.roster.clone()).expect("server");
    fed.share(&mut server, &(0..n).collect::<Vec<_>>());
    for i in 0..n {
        let received = fed.inbox[i].clone();
        let masked = fed.clients[i].masked_input(&received, &[0; 32]).expect("mask");
        server.add_masked(&fed.names[i], &masked).expect("add");
    }
    (fed, server)
}

#[test]
fn unmask_refuses_sets_that_are_not_a_split() {
    let names: Vec<String> = (0..5).map(name).collect();
    let list = |idx: &[usize]| idx.iter().map(|&i| names[i].clone()).collect::<Vec<_>>();
    let check = |survivors: Vec<String>, dropped: Vec<String>, expected: Error| {
        let (mut fed, _) = masked_federation(5, 3);
        assert_eq!(fed.clients[0].unmask(&survivors, &dropped), Err(expected));
        // A refusal ends the attempt.
        let (s, d) = (list(&[0, 1, 2, 3, 4]), vec![]);
        assert_eq!(
            fed.clients[0].unmask(&s, &d),
            Err(Error::Ended { step: "unmask" })
        );
    };
    let not_split = |i: usize, problem| Error::NotSplit {
        node: names[i].clone(),
        problem,
    };
    check(
        list(&[0, 1, 2, 3]),
        list(&[3, 4]),
        not_split(3, "is named both a survivor and dropped"),
    );
    check(
        list(&[0, 1, 2]),
        list(&[4]),
        not_split(3, "sent shares but is named neither a survivor nor dropped"),
    );
    check(
        list(&[0, 1, 2, 3]),
        vec!["stranger".into()],
        Error::NotSplit {
            node: "stranger".into(),
            problem: "did not send shares, so it can be neither a survivor nor dropped",
        },
    );
    check(
        list(&[0, 1, 1, 2, 3, 4]),
        vec![],
        Error::Duplicate {
            node: names[1].clone(),
            what: "survivors",
        },
    );
    check(
        list(&[1, 2, 3, 4]),
        list(&[0]),
        Error::NotSurvivor {
            node: names[0].clone(),
        },
    );
    check(
        list(&[0, 1]),
        list(&[2, 3, 4]),
        Error::BelowThreshold {
            have: 2,
            need: 3,
            what: "survivors",
        },
    );
}

#[test]
fn steps_run_once_and_in_order() {
    let (mut fed, server) = masked_federation(3, 2);
    let (s, d) = server.unmask_sets();
    fed.clients[0].unmask(&s, &d).expect("first unmask");
    assert_eq!(
        fed.clients[0].unmask(&s, &d),
        Err(Error::Replay { step: "unmask" })
    );
    assert_eq!(
        fed.clients[1].masked_input(&[], &[0; 32]),
        Err(Error::Replay { step: "masked_input" })
    );
    let roster = fed.roster.clone();
    assert_eq!(
        fed.clients[2].share_keys(2, &roster),
        Err(Error::Replay { step: "share_keys" })
    );

    let c = ctx(Ring::Z64, 4, 2);
    let (mut fresh, _) = Client::new(c, "a");
    assert_eq!(
        fresh.masked_input(&[], &[0; 32]),
        Err(Error::OutOfOrder {
            step: "masked_input",
            needs: "share_keys"
        })
    );
    assert_eq!(
        fresh.unmask(&[], &[]),
        Err(Error::OutOfOrder {
            step: "unmask",
            needs: "masked_input"
        })
    );
}

#[test]
fn received_shares_are_checked() {
    let ctx = ctx(Ring::Z64, 4, 2);
    let input = [0u8; 32];
    let setup = || {
        let mut fed = Federation::new(ctx, 3, 31);
        let mut server = Server::new(ctx, fed.roster.clone()).expect("server");
        fed.share(&mut server, &[0, 1, 2]);
        fed
    };
    let from = |i: usize| name(i);

    let mut fed = setup();
    let mut received = fed.inbox[0].clone();
    received[0].1[5] ^= 1;
    assert_eq!(
        fed.clients[0].masked_input(&received, &input),
        Err(Error::BadShare {
            from: from(1),
            problem: "it does not open with our keys for this attempt"
        })
    );

    // A share sealed for someone else, relayed under its real sender's name.
    let mut fed = setup();
    let mut received = fed.inbox[0].clone();
    received[1].1 = fed.inbox[1][1].1.clone();
    assert!(matches!(
        fed.clients[0].masked_input(&received, &input),
        Err(Error::BadShare { .. })
    ));

    let mut fed = setup();
    let mut received = fed.inbox[0].clone();
    received.push(received[0].clone());
    assert_eq!(
        fed.clients[0].masked_input(&received, &input),
        Err(Error::Duplicate {
            node: from(1),
            what: "received shares"
        })
    );

    let mut fed = setup();
    let mut received = fed.inbox[0].clone();
    received[0].0 = "stranger".into();
    assert_eq!(
        fed.clients[0].masked_input(&received, &input),
        Err(Error::NotMember {
            node: "stranger".into()
        })
    );

    let mut fed = setup();
    let received = fed.inbox[0].clone();
    assert_eq!(
        fed.clients[0].masked_input(&received, &input[..31]),
        Err(Error::WrongLength {
            what: "the answer",
            expected: 32,
            got: 31
        })
    );

    // Alone with my own shares: below the threshold.
    let mut fed = setup();
    assert_eq!(
        fed.clients[0].masked_input(&[], &input),
        Err(Error::BelowThreshold {
            have: 1,
            need: 2,
            what: "members sent shares"
        })
    );

    // Shares of another attempt do not open.
    let mut other = ctx;
    other.at.attempt = 1;
    let mut fed = setup();
    let mut replayed = Federation::new(other, 3, 31);
    let mut server = Server::new(other, replayed.roster.clone()).expect("server");
    replayed.share(&mut server, &[0, 1, 2]);
    assert_eq!(replayed.roster, fed.roster, "same seeds, same keys");
    assert!(matches!(
        fed.clients[0].masked_input(&replayed.inbox[0], &input),
        Err(Error::BadShare { .. })
    ));
}

#[test]
fn the_roster_must_carry_my_keys() {
    let c = ctx(Ring::Z64, 4, 2);
    let mut fed = Federation::new(c, 3, 41);
    let mut roster = fed.roster.clone();
    roster[0].1 = roster[1].1;
    roster[1].1.cipher[0] ^= 1;
    roster[1].1.mask[0] ^= 1;
    assert_eq!(
        fed.clients[0].share_keys(2, &roster),
        Err(Error::NotMyKeys { node: name(0) })
    );
    let roster = vec![fed.roster[0].clone(), fed.roster[2].clone()];
    assert_eq!(
        fed.clients[1].share_keys(2, &roster),
        Err(Error::NotMember { node: name(1) })
    );
    // The step's threshold cannot be lowered by the roster.
    let mut strict = Federation::new(ctx(Ring::Z64, 4, 3), 3, 42);
    let roster = strict.roster.clone();
    assert!(matches!(
        strict.clients[0].share_keys(2, &roster),
        Err(Error::BadThreshold { .. })
    ));
    // A low-order key is refused (all-zero X25519 result).
    let (mut c0, k0) = Client::with_seed(c, &name(0), [9; 32]);
    let mut roster = fed.roster.clone();
    roster[0].1 = k0;
    roster[1].1.mask = [0; 32];
    assert_eq!(c0.share_keys(2, &roster), Err(Error::WeakKey { node: name(1) }));
}

#[test]
fn the_server_checks_every_message() {
    let (fed, mut server) = masked_federation(3, 2);
    let n0 = name(0);
    assert_eq!(
        server.shared(&n0),
        Err(Error::Late {
            node: n0.clone(),
            what: "nodes that sent shares"
        })
    );
    assert_eq!(
        server.add_masked(&n0, &[0; 32]),
        Err(Error::Duplicate {
            node: n0.clone(),
            what: "masked answers"
        })
    );
    assert_eq!(
        server.add_masked("stranger", &[0; 32]),
        Err(Error::NotMember {
            node: "stranger".into()
        })
    );
    let _ = server.unmask_sets();
    let _ = fed;

    // Before any masked answer: membership, duplicates, lengths, lateness.
    let c = ctx(Ring::Z128, 2, 2);
    let fed = Federation::new(c, 3, 51);
    let mut server = Server::new(c, fed.roster.clone()).expect("server");
    server.shared(&name(0)).expect("shared");
    assert_eq!(
        server.shared(&name(0)),
        Err(Error::Duplicate {
            node: name(0),
            what: "nodes that sent shares"
        })
    );
    assert_eq!(
        server.add_masked(&name(1), &[0; 32]),
        Err(Error::NoShares { node: name(1) })
    );
    assert_eq!(
        server.add_masked(&name(0), &[0; 31]),
        Err(Error::WrongLength {
            what: "the masked answer",
            expected: 32,
            got: 31
        })
    );
    server.shared(&name(1)).expect("shared");
    server.add_masked(&name(0), &[0; 32]).expect("masked");
    let (survivors, dropped) = server.unmask_sets();
    assert_eq!((survivors, dropped), (vec![name(0)], vec![name(1)]));
    assert_eq!(
        server.add_masked(&name(1), &[0; 32]),
        Err(Error::Late {
            node: name(1),
            what: "survivors"
        })
    );
    assert_eq!(
        server.add_reveal(&name(1), vec![]),
        Err(Error::NotSurvivor { node: name(1) })
    );
}

#[test]
fn reveals_are_checked_and_a_lie_is_caught() {
    let (mut fed, mut server) = masked_federation(5, 3);
    let (s, d) = server.unmask_sets();
    let mut reveals: Vec<Vec<(String, Vec<u8>)>> = (0..5)
        .map(|i| fed.clients[i].unmask(&s, &d).expect("unmask"))
        .collect();
    let bad = |from: usize, problem| Error::BadShare {
        from: name(from),
        problem,
    };

    let mut short = reveals[0].clone();
    short.pop();
    assert_eq!(
        server.add_reveal(&name(0), short),
        Err(bad(0, "a reveal holds one share of every node that sent shares"))
    );
    let mut twice = reveals[0].clone();
    twice[1] = twice[0].clone();
    assert_eq!(
        server.add_reveal(&name(0), twice),
        Err(bad(0, "two shares of one node"))
    );
    // Someone else's share (another x) is not this revealer's.
    let mut foreign = reveals[0].clone();
    foreign[0] = reveals[1][0].clone();
    assert_eq!(
        server.add_reveal(&name(0), foreign),
        Err(bad(0, "a share not at the revealer's position"))
    );
    let mut garbled = reveals[0].clone();
    garbled[0].1.truncate(10);
    assert_eq!(
        server.add_reveal(&name(0), garbled),
        Err(bad(0, "a share is 36 bytes"))
    );

    // One survivor lies about the self-mask seed share of another: with more than t
    // reveals the shares disagree, and nothing is released.
    reveals[4][2].1[10] ^= 1;
    for (i, r) in reveals.into_iter().enumerate() {
        server.add_reveal(&name(i), r).expect("reveal");
    }
    assert!(server.can_finish());
    assert_eq!(
        server.finish(),
        Err(Error::SharesDisagree {
            owner: name(2),
            secret: "self-mask seed"
        })
    );
}

/// Pearson correlation of two equally long series.
fn correlation(a: &[f64], b: &[f64]) -> f64 {
    let n = a.len() as f64;
    let (ma, mb) = (a.iter().sum::<f64>() / n, b.iter().sum::<f64>() / n);
    let (mut sab, mut saa, mut sbb) = (0.0, 0.0, 0.0);
    for (x, y) in a.iter().zip(b) {
        sab += (x - ma) * (y - mb);
        saa += (x - ma) * (x - ma);
        sbb += (y - mb) * (y - mb);
    }
    sab / (saa * sbb).sqrt()
}

#[test]
fn a_masked_answer_says_nothing_about_the_answer() {
    let len = 100_000u64;
    let c = ctx(Ring::Z64, len, 2);
    let mut fed = Federation::new(c, 3, 61);
    let mut server = Server::new(c, fed.roster.clone()).expect("server");
    fed.share(&mut server, &[0, 1, 2]);
    // A strongly structured answer: a ramp.
    let values: Vec<u64> = (0..len).map(|i| i * 1000).collect();
    let input: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let received = fed.inbox[0].clone();
    let masked = fed.clients[0].masked_input(&received, &input).expect("mask");
    assert_ne!(masked, input);
    let masked: Vec<f64> = masked
        .chunks_exact(8)
        .map(|c| {
            let mut b = [0u8; 8];
            b.copy_from_slice(c);
            u64::from_le_bytes(b) as f64
        })
        .collect();
    let plain: Vec<f64> = values.iter().map(|&v| v as f64).collect();
    let equal = masked.iter().zip(&plain).filter(|(m, p)| m == p).count();
    assert!(equal < 3, "{equal} elements unmasked");
    let r = correlation(&masked, &plain);
    assert!(r.abs() < 0.01, "correlation {r}");
}

#[test]
fn the_key_statement_binds_every_field() {
    let c = ctx(Ring::Z64, 4, 2);
    let keys = PublicKeys {
        cipher: [1; 32],
        mask: [2; 32],
    };
    let base = key_statement(&c, "ons", &keys);
    assert_eq!(base, key_statement(&c, "ons", &keys));
    assert!(base.starts_with(b"\x16\0\0\0fedstat-secagg/keys/v1"));
    let mut variants = Vec::new();
    let mut v = c;
    v.at.experiment += 1;
    variants.push(key_statement(&v, "ons", &keys));
    let mut v = c;
    v.at.round += 1;
    variants.push(key_statement(&v, "ons", &keys));
    let mut v = c;
    v.at.phase = Phase::Table;
    variants.push(key_statement(&v, "ons", &keys));
    let mut v = c;
    v.at.attempt += 1;
    variants.push(key_statement(&v, "ons", &keys));
    let mut v = c;
    v.ring = Ring::Z128;
    variants.push(key_statement(&v, "ons", &keys));
    let mut v = c;
    v.len += 1;
    variants.push(key_statement(&v, "ons", &keys));
    let mut v = c;
    v.threshold += 1;
    variants.push(key_statement(&v, "ons", &keys));
    variants.push(key_statement(&c, "onS", &keys));
    variants.push(key_statement(
        &c,
        "ons",
        &PublicKeys {
            cipher: [2; 32],
            mask: [1; 32],
        },
    ));
    for (i, s) in variants.iter().enumerate() {
        assert_ne!(*s, base, "variant {i}");
    }
}

#[test]
fn fresh_keys_differ() {
    let c = ctx(Ring::Z64, 4, 2);
    let (_, a) = Client::new(c, "a");
    let (_, b) = Client::new(c, "a");
    assert_ne!(a, b);
    assert_ne!(a.cipher, a.mask);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn the_sum_is_exact_whatever_the_dropouts_and_arrival_order(
        n in 3usize..7,
        len in 1u64..40,
        wide in any::<bool>(),
        seed in any::<u64>(),
        drop_mask in any::<u8>(),
        reversed in any::<bool>(),
    ) {
        let ring = if wide { Ring::Z128 } else { Ring::Z64 };
        let t = (n / 2 + 1) as u32;
        // At most n - t nodes drop, each at a step chosen by the bits of drop_mask.
        let mut drops = Drops { reversed, ..Drops::default() };
        for i in 0..(n - t as usize) {
            match (drop_mask >> (2 * i)) & 3 {
                1 => drops.before_sharing.push(i),
                2 => drops.before_masking.push(i),
                3 => drops.before_revealing.push(i),
                _ => {}
            }
        }
        let (got, expected) = run(ring, n, t, len, &drops, seed);
        prop_assert_eq!(got, Ok(expected));
    }
}
