//! Speed of masking (`Client::masked_input`) and unmasking (`Server::finish`) for 10 members x
//! 1,000,000 values in Z mod 2^128, with no dropout and with one node dropping after sharing.
//! Criterion-free: `cargo bench -p fedstat-secagg` prints MB/s of masked vector and of
//! keystream (every mask is one ChaCha20 stream as long as the vector).

use std::time::Instant;

use fedstat_proto::secure::{Ring, SecureRound};
use fedstat_proto::wire::Phase;
use fedstat_secagg::{Client, Context, Server};

const MEMBERS: usize = 10;
const THRESHOLD: u32 = 6;
const LEN: u64 = 1_000_000;

fn main() {
    let ctx = Context {
        at: SecureRound {
            experiment: 1,
            round: 1,
            phase: Phase::Train,
            attempt: 0,
        },
        ring: Ring::Z128,
        len: LEN,
        threshold: THRESHOLD,
    };
    let bytes = LEN as usize * ctx.ring.width();
    let mb = bytes as f64 / 1e6;
    println!(
        "{MEMBERS} members x {LEN} values in Z mod 2^128 ({mb:.0} MB per vector), threshold {THRESHOLD}"
    );
    for dropped in [0usize, 1] {
        run(ctx, bytes, dropped);
    }
}

fn run(ctx: Context, bytes: usize, dropped: usize) {
    let names: Vec<String> = (0..MEMBERS).map(|i| format!("office-{i:02}")).collect();
    let mut clients = Vec::new();
    let mut roster = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let (client, keys) = Client::with_seed(ctx, name, [i as u8 + 1; 32]);
        clients.push(client);
        roster.push((name.clone(), keys));
    }
    let mut server = Server::new(ctx, roster.clone()).expect("server");
    let mut inbox: Vec<Vec<(String, Vec<u8>)>> = vec![Vec::new(); MEMBERS];
    for (i, client) in clients.iter_mut().enumerate() {
        for (to, ciphertext) in client.share_keys(ctx.threshold, &roster).expect("share") {
            let j = names.iter().position(|n| *n == to).expect("member");
            inbox[j].push((names[i].clone(), ciphertext));
        }
        server.shared(&names[i]).expect("shared");
    }

    let input: Vec<u8> = (0..bytes).map(|i| (i % 251) as u8).collect();
    let mb = bytes as f64 / 1e6;
    let mut mask_secs = Vec::new();
    for i in dropped..MEMBERS {
        let start = Instant::now();
        let masked = clients[i].masked_input(&inbox[i], &input).expect("mask");
        mask_secs.push(start.elapsed().as_secs_f64());
        server.add_masked(&names[i], &masked).expect("add");
    }
    mask_secs.sort_by(f64::total_cmp);
    let median = mask_secs[mask_secs.len() / 2];
    // One self mask and one pairwise mask per other member.
    let streams = MEMBERS as f64;
    println!(
        "masked_input ({dropped} dropped): median {:.1} ms: {:.0} MB/s of vector, {:.0} MB/s of keystream",
        median * 1e3,
        mb / median,
        mb * streams / median
    );

    let (survivors, gone) = server.unmask_sets();
    for (i, client) in clients.iter_mut().enumerate().skip(dropped) {
        let shares = client.unmask(&survivors, &gone).expect("unmask");
        server.add_reveal(&names[i], shares).expect("reveal");
    }
    let start = Instant::now();
    let sum = server.finish().expect("finish");
    let secs = start.elapsed().as_secs_f64();
    let streams = (survivors.len() + gone.len() * survivors.len()) as f64;
    println!(
        "finish ({dropped} dropped, {streams} streams): {:.1} ms: {:.0} MB/s of vector, {:.0} MB/s of keystream",
        secs * 1e3,
        mb / secs,
        mb * streams / secs
    );
    // The sum of the survivors' identical inputs.
    let mut first = [0u8; 16];
    first.copy_from_slice(&input[..16]);
    let expected = u128::from_le_bytes(first).wrapping_mul(survivors.len() as u128);
    assert_eq!(sum[..16], expected.to_le_bytes(), "the sum is exact");
}
