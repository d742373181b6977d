//! What other parties send a secure-aggregation member or the coordinator's unmasking: sealed
//! shares a node opens (`Client::masked_input`) and revealed shares the coordinator decodes and
//! interpolates (`Server::add_reveal`, `finish`). Arbitrary bytes must be refused cleanly,
//! naming the sender, and never panic or yield a sum.
#![no_main]

use fedstat_proto::secure::{Ring, SecureRound};
use fedstat_proto::wire::Phase;
use fedstat_secagg::{Client, Context, Server};
use libfuzzer_sys::fuzz_target;

const MEMBERS: [&str; 3] = ["a", "b", "c"];

fn ctx() -> Context {
    Context {
        at: SecureRound {
            experiment: 1,
            round: 1,
            phase: Phase::Train,
            attempt: 0,
        },
        ring: Ring::Z64,
        len: 4,
        threshold: 2,
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&kind, rest)) = data.split_first() else {
        return;
    };
    // A fixed round of three members (seeded: reproducible, never used outside fuzzing).
    let mut clients: Vec<Client> = Vec::new();
    let mut roster = Vec::new();
    for (i, name) in MEMBERS.iter().enumerate() {
        let (client, keys) = Client::with_seed(ctx(), name, [i as u8 + 1; 32]);
        clients.push(client);
        roster.push((name.to_string(), keys));
    }
    let mut sealed = Vec::new();
    for (client, (name, _)) in clients.iter_mut().zip(&roster) {
        let Ok(out) = client.share_keys(2, &roster) else {
            return;
        };
        sealed.push((name.clone(), out));
    }
    // Shares addressed to `a`, from `b` and `c`.
    let to_a: Vec<(String, Vec<u8>)> = sealed
        .iter()
        .filter(|(from, _)| from != "a")
        .filter_map(|(from, out)| {
            out.iter()
                .find(|(to, _)| to == "a")
                .map(|(_, c)| (from.clone(), c.clone()))
        })
        .collect();
    let input = vec![0u8; 4 * 8];
    if kind % 2 == 0 {
        // A forged ciphertext in place of `b`'s.
        let mut forged = to_a.clone();
        forged[0].1 = rest.to_vec();
        let _ = clients[0].masked_input(&forged, &input);
        return;
    }
    // Everyone masks; the coordinator receives a forged reveal from `a`.
    let mut server = match Server::new(ctx(), roster.clone()) {
        Ok(s) => s,
        Err(_) => return,
    };
    for name in MEMBERS {
        if server.shared(name).is_err() {
            return;
        }
    }
    let Ok(masked) = clients[0].masked_input(&to_a, &input) else {
        return;
    };
    if server.add_masked("a", &masked).is_err() {
        return;
    }
    let (survivors, _) = server.unmask_sets();
    let pieces: Vec<(String, Vec<u8>)> = rest
        .chunks(37)
        .zip(survivors.iter().cycle())
        .map(|(chunk, owner)| (owner.clone(), chunk.to_vec()))
        .collect();
    let _ = server.add_reveal("a", pieces);
    let _ = server.can_finish();
    let _ = server.finish();
});
