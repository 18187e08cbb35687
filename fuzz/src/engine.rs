//! The engine: corpus replay, mutation, outcome feedback, crash artifacts.

use std::collections::HashSet;
use std::fs;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// One fuzz target.
pub struct Target {
    pub name: &'static str,
    /// What it checks, for `praefect-fuzz list`.
    pub about: &'static str,
    /// Checks one input and names its outcome class; panics when a property does not hold.
    pub check: fn(&[u8]) -> String,
    /// Tokens the mutator inserts (keywords, magic numbers of the format).
    pub dictionary: fn() -> Vec<Vec<u8>>,
    /// Longest input the mutator makes: the parsers' limits are tested by the unit tests;
    /// here, many small inputs find more.
    pub max_len: usize,
}

/// How long one target runs.
#[derive(Clone, Copy, Debug)]
pub enum Budget {
    Time(Duration),
    /// A number of mutated inputs (deterministic with a fixed seed: for tests).
    Execs(u64),
}

/// A run that found nothing.
#[derive(Debug)]
pub struct Report {
    pub replayed: usize,
    pub execs: u64,
    pub pool: usize,
    pub outcomes: Vec<String>,
    pub elapsed: Duration,
}

/// A run that found something: the input is saved under `artifacts/<target>/`.
#[derive(Debug)]
pub struct Finding {
    pub kind: &'static str,
    pub message: String,
    pub artifact: Option<PathBuf>,
    pub input: Vec<u8>,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.kind, self.message)?;
        if let Some(path) = &self.artifact {
            write!(f, " (input: {})", path.display())?;
        }
        Ok(())
    }
}

/// An input that takes longer than this to check counts as a hang.
const SLOW: Duration = Duration::from_secs(2);
/// The pool of inputs kept in memory stays below this.
const MAX_POOL: usize = 20_000;

/// Where the crate's corpus and artifacts live.
pub fn fuzz_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The committed corpus of `target`: its files, sorted by name.
pub fn corpus_files(target: &str) -> Vec<PathBuf> {
    let dir = fuzz_dir().join("corpus").join(target);
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_file())
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

/// Checks one input, turning a panic or a hang into a finding.
pub fn check_one(target: &Target, input: &[u8]) -> Result<String, Finding> {
    let started = Instant::now();
    let result = panic::catch_unwind(AssertUnwindSafe(|| (target.check)(input)));
    match result {
        Ok(outcome) if started.elapsed() > SLOW => Err(Finding {
            kind: "slow",
            message: format!("one input took {:?} (outcome {outcome})", started.elapsed()),
            artifact: None,
            input: input.to_vec(),
        }),
        Ok(outcome) => Ok(outcome),
        Err(payload) => {
            let message = payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "panic".into());
            Err(Finding {
                kind: "crash",
                message,
                artifact: None,
                input: input.to_vec(),
            })
        }
    }
}

/// A 64-bit FNV-1a hash: names inputs (artifacts, grown corpus) and seeds choices that must
/// depend only on the input.
pub fn fnv(data: &[u8]) -> u64 {
    let mut hash = 0xcbf2_9ce4_8422_2325u64;
    for byte in data {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

fn save(dir: &Path, prefix: &str, input: &[u8]) -> Option<PathBuf> {
    fs::create_dir_all(dir).ok()?;
    let path = dir.join(format!("{prefix}{:016x}", fnv(input)));
    fs::write(&path, input).ok()?;
    Some(path)
}

/// Replays the corpus, then fuzzes `target` for `budget`. With `grow`, inputs that reach an
/// outcome the corpus did not are written to the corpus directory.
pub fn run(target: &Target, budget: Budget, seed: u64, grow: bool) -> Result<Report, Finding> {
    let started = Instant::now();
    let corpus_dir = fuzz_dir().join("corpus").join(target.name);
    let artifacts = fuzz_dir().join("artifacts").join(target.name);
    let mut pool: Vec<Vec<u8>> = Vec::new();
    let mut outcomes = HashSet::new();
    // A quiet hook while fuzzing: a finding is reported once, with its input, by the caller.
    let previous_hook = panic::take_hook();
    panic::set_hook(Box::new(|_| {}));
    let result = (|| {
        for path in corpus_files(target.name) {
            let input = fs::read(&path).unwrap_or_default();
            match check_one(target, &input) {
                Ok(outcome) => {
                    outcomes.insert(outcome);
                }
                Err(mut finding) => {
                    finding.message =
                        format!("corpus file {}: {}", path.display(), finding.message);
                    finding.artifact = Some(path);
                    return Err(finding);
                }
            }
            pool.push(input);
        }
        if pool.is_empty() {
            pool.push(Vec::new());
        }
        let replayed = pool.len();
        let dictionary = (target.dictionary)();
        let mut rng = StdRng::seed_from_u64(seed);
        let mut execs = 0u64;
        loop {
            let done = match budget {
                Budget::Time(limit) => execs.is_multiple_of(64) && started.elapsed() >= limit,
                Budget::Execs(limit) => execs >= limit,
            };
            if done {
                break;
            }
            execs += 1;
            let base = &pool[rng.gen_range(0..pool.len())];
            let input = mutate(base, &pool, &dictionary, target.max_len, &mut rng);
            match check_one(target, &input) {
                Ok(outcome) => {
                    if outcomes.insert(outcome) && pool.len() < MAX_POOL {
                        if grow {
                            save(&corpus_dir, "", &input);
                        }
                        pool.push(input);
                    }
                }
                Err(mut finding) => {
                    finding.artifact = save(&artifacts, &format!("{}-", finding.kind), &input);
                    return Err(finding);
                }
            }
        }
        let mut outcomes: Vec<String> = outcomes.iter().cloned().collect();
        outcomes.sort();
        Ok(Report {
            replayed,
            execs,
            pool: pool.len(),
            outcomes,
            elapsed: started.elapsed(),
        })
    })();
    panic::set_hook(previous_hook);
    result
}

/// Numbers at the edges of the formats: lengths, flags, limits.
const INTERESTING_U32: &[u32] = &[
    0,
    1,
    2,
    3,
    4,
    5,
    0x7f,
    0x80,
    0xff,
    0x100,
    0xfff0,
    0xffff,
    0x1_0000,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    16 * 1024 * 1024,
    16 * 1024 * 1024 + 1,
    4 * 1024 * 1024,
];

/// One to four stacked mutations of `base`.
pub fn mutate(
    base: &[u8],
    pool: &[Vec<u8>],
    dictionary: &[Vec<u8>],
    max_len: usize,
    rng: &mut StdRng,
) -> Vec<u8> {
    let mut data = base.to_vec();
    for _ in 0..rng.gen_range(1..=4) {
        mutate_once(&mut data, pool, dictionary, rng);
    }
    data.truncate(max_len);
    data
}

fn mutate_once(data: &mut Vec<u8>, pool: &[Vec<u8>], dictionary: &[Vec<u8>], rng: &mut StdRng) {
    let len = data.len();
    let pos = |rng: &mut StdRng, extra: usize| rng.gen_range(0..len + extra);
    match rng.gen_range(0..12) {
        0 if len > 0 => {
            let i = pos(rng, 0);
            data[i] ^= 1 << rng.gen_range(0..8);
        }
        1 if len > 0 => {
            let i = pos(rng, 0);
            data[i] = rng.gen();
        }
        2 if len > 0 => {
            let i = pos(rng, 0);
            data[i] = *[
                0u8, 1, 0x7f, 0x80, 0xff, b'0', b'9', b'a', b'f', b'.', b'\n',
            ]
            .get(rng.gen_range(0..11))
            .unwrap_or(&0);
        }
        3 => {
            let i = pos(rng, 1);
            let count = rng.gen_range(1..=8);
            let bytes: Vec<u8> = (0..count).map(|_| rng.gen()).collect();
            data.splice(i..i, bytes);
        }
        4 if len > 0 => {
            let start = pos(rng, 0);
            let end = (start + rng.gen_range(1..=16)).min(len);
            data.drain(start..end);
        }
        5 if len > 0 => {
            let start = pos(rng, 0);
            let end = (start + rng.gen_range(1..=32)).min(len);
            let copy = data[start..end].to_vec();
            let at = pos(rng, 1);
            data.splice(at..at, copy);
        }
        6 => {
            let value = INTERESTING_U32[rng.gen_range(0..INTERESTING_U32.len())];
            let bytes = if rng.gen() {
                value.to_be_bytes()
            } else {
                value.to_le_bytes()
            };
            let at = pos(rng, 1);
            if rng.gen() || at + 4 > len {
                data.splice(at..at, bytes);
            } else {
                data[at..at + 4].copy_from_slice(&bytes);
            }
        }
        7 | 8 if !dictionary.is_empty() => {
            let token = &dictionary[rng.gen_range(0..dictionary.len())];
            let at = pos(rng, 1);
            if rng.gen() || at + token.len() > len {
                data.splice(at..at, token.iter().copied());
            } else {
                data[at..at + token.len()].copy_from_slice(token);
            }
        }
        9 if !pool.is_empty() => {
            let other = &pool[rng.gen_range(0..pool.len())];
            let cut = pos(rng, 1);
            let from = rng.gen_range(0..=other.len());
            data.truncate(cut);
            data.extend_from_slice(&other[from..]);
        }
        10 if len > 0 => {
            data.truncate(pos(rng, 0));
        }
        11 => {
            // A protobuf varint: tags and lengths of the message formats.
            let mut value: u64 = match rng.gen_range(0..3) {
                0 => rng.gen_range(0..300),
                1 => u64::from(rng.gen::<u32>()),
                _ => rng.gen(),
            };
            let mut bytes = Vec::new();
            while value >= 0x80 {
                bytes.push((value as u8) | 0x80);
                value >>= 7;
            }
            bytes.push(value as u8);
            let at = pos(rng, 1);
            data.splice(at..at, bytes);
        }
        _ => {
            let i = pos(rng, 1);
            data.insert(i, rng.gen());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mutations_stay_within_the_length_limit() {
        let mut rng = StdRng::seed_from_u64(1);
        let pool = vec![b"hello world".to_vec()];
        let dictionary = vec![b"token".to_vec()];
        for _ in 0..10_000 {
            let out = mutate(&pool[0], &pool, &dictionary, 16, &mut rng);
            assert!(out.len() <= 16);
        }
    }

    #[test]
    fn a_failing_property_is_reported_with_its_input() {
        fn check(input: &[u8]) -> String {
            assert!(!input.contains(&b'!'), "found it");
            "ok".into()
        }
        let target = Target {
            name: "engine-self-test",
            about: "",
            check,
            dictionary: || vec![b"!".to_vec()],
            max_len: 64,
        };
        let finding = check_one(&target, b"a!").unwrap_err();
        assert_eq!(finding.kind, "crash");
        assert_eq!(finding.message, "found it");
        assert_eq!(check_one(&target, b"a").unwrap(), "ok");
    }
}
