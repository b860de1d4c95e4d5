//! Kill -9 at random instants: the checkpoint directory always loads and verifies, and
//! resuming reaches the weights of an uninterrupted run, bit for bit.
//!
//! The training process is this test binary itself, started again with `TINYGPT_CRASH_CHILD`
//! set (the `child_train` test then trains instead of returning). It writes a latest state
//! after every step, so many kills land while a checkpoint is being written.
//!
//! `cargo test --release --test crash -- --ignored --nocapture` (about a minute; CI runs it).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use tinygpt::candle::Device;
use tinygpt::checkpoint::{self, files};
use tinygpt::train::TrainerState;
use tinygpt::{
    Gpt, GptConfig, Objective, Pretraining, TokenDataset, Tokenizer, TrainConfig, Trainer,
};

const CHILD_ENV: &str = "TINYGPT_CRASH_CHILD";
const KILLS: usize = 50;
const MAX_ITERS: usize = 24;

fn text() -> String {
    "First Citizen: Before we proceed any further, hear me speak. All: Speak, speak. ".repeat(30)
}

fn cfg() -> TrainConfig {
    TrainConfig {
        max_iters: MAX_ITERS,
        eval_interval: 6,
        eval_iters: 2,
        log_interval: 1,
        batch_size: 4,
        warmup_iters: 4,
        lr_decay_iters: MAX_ITERS,
        save_interval: 1,
        keep_last: 2,
        ..TrainConfig::default()
    }
}

/// Trains into `out` to the end: fresh, or from its newest state when it has one.
fn train(out: &Path) {
    let text = text();
    let resumable = checkpoint::latest_state(out).ok();
    let (model, tokenizer) = match &resumable {
        Some(from) => checkpoint::load_trainable(from, &Device::Cpu).unwrap(),
        None => {
            let tok = Tokenizer::train_char(&text).unwrap();
            let cfg = GptConfig {
                vocab_size: tok.vocab_size(),
                block_size: 16,
                n_layer: 2,
                n_head: 2,
                n_embd: 32,
                dropout: 0.1,
                bias: true,
                ..Default::default()
            };
            (Gpt::init(&cfg, 7, &Device::Cpu).unwrap(), tok)
        }
    };
    let data = TokenDataset::from_tokens(tokenizer.encode(&text).unwrap(), 0.1).unwrap();
    let mut obj = Pretraining::new(model, tokenizer, data, 4).unwrap();
    let mut trainer = Trainer::new(cfg(), obj.parameters().unwrap())
        .unwrap()
        .with_out_dir(out);
    if let Some(from) = &resumable {
        trainer = trainer.resume_from(from).unwrap();
    }
    trainer.fit(&mut obj, |_| {}).unwrap();
}

/// The final weights and moments of the run in `out`.
fn final_files(out: &Path) -> (Vec<u8>, Vec<u8>) {
    let last = checkpoint::latest_state(out).unwrap();
    assert_eq!(TrainerState::load(&last).unwrap().step, MAX_ITERS);
    (
        std::fs::read(last.join(files::MODEL)).unwrap(),
        std::fs::read(last.join(files::OPTIMIZER)).unwrap(),
    )
}

/// Copies a directory tree (hidden entries included).
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let dest = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &dest);
        } else {
            std::fs::copy(entry.path(), dest).unwrap();
        }
    }
}

/// What a kill left next to and inside `out`: temporary or old directories.
fn leftovers(root: &Path, out: &Path) -> usize {
    let count = |d: &Path| {
        std::fs::read_dir(d)
            .map(|r| {
                r.filter(|e| {
                    let n = e
                        .as_ref()
                        .unwrap()
                        .file_name()
                        .to_string_lossy()
                        .into_owned();
                    n.contains(".tmp-") || n.contains(".old-")
                })
                .count()
            })
            .unwrap_or(0)
    };
    count(root) + count(out)
}

#[test]
#[ignore = "kills a training process 50 times (about a minute): cargo test --release --test crash -- --ignored"]
fn child_train() {
    // Only as the child process of `kill_9_at_random_instants_loses_nothing`.
    if let Ok(dir) = std::env::var(CHILD_ENV) {
        train(Path::new(&dir));
    }
}

#[test]
#[ignore = "kills a training process 50 times (about a minute): cargo test --release --test crash -- --ignored"]
fn kill_9_at_random_instants_loses_nothing() {
    let root = tempfile::tempdir().unwrap();
    // The uninterrupted run, in this process.
    let reference = root.path().join("reference");
    train(&reference);
    let want = final_files(&reference);

    // How long a whole run takes as a child process, to spread the kills over it.
    let exe = std::env::current_exe().unwrap();
    let child = |out: &PathBuf| {
        Command::new(&exe)
            .args(["--exact", "child_train", "--ignored", "--test-threads", "1"])
            .env(CHILD_ENV, out)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    let timing = root.path().join("timing");
    let t0 = Instant::now();
    assert!(child(&timing).wait().unwrap().success());
    let run_time = t0.elapsed();
    assert_eq!(final_files(&timing), want, "a run in a child process");

    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(12);
    let work = root.path().join("runs");
    std::fs::create_dir_all(&work).unwrap();
    let out = work.join("out");
    let (mut with_leftovers, mut finished, mut before_first) = (0, 0, 0);
    let mut steps_seen = std::collections::BTreeSet::new();
    // Until 50 kills have landed mid-run (a child that finished before its kill does not
    // count; the next one starts over).
    let (mut kill, mut attempts) = (0, 0);
    while kill < KILLS {
        attempts += 1;
        assert!(
            attempts < 4 * KILLS,
            "the runs keep finishing before their kill"
        );
        // Every other kill lands in a fresh run, so the kills cover the whole run however fast
        // it is; the others in a run resumed from what the last kill left.
        if kill % 2 == 0 && work.join("out").exists() {
            std::fs::remove_dir_all(&work).unwrap();
            std::fs::create_dir_all(&work).unwrap();
        }
        // Spread over what is left of the run (a resumed child has fewer steps to go).
        let done = checkpoint::latest_state(&out)
            .ok()
            .and_then(|d| TrainerState::load(d).ok())
            .map_or(0, |s| s.step);
        let left = (MAX_ITERS - done) as f64 / MAX_ITERS as f64;
        let mut proc = child(&out);
        let wait = rng.random_range(0.0..1.0) * run_time.as_secs_f64() * left.max(0.1);
        std::thread::sleep(Duration::from_secs_f64(wait));
        let _ = proc.kill(); // SIGKILL
        let status = proc.wait().unwrap();
        if status.success() {
            finished += 1;
        } else if leftovers(&work, &out) > 0 {
            with_leftovers += 1;
        }
        // Whatever the instant: the directory loads and verifies.
        match checkpoint::latest_state(&out) {
            Ok(last) => {
                assert!(
                    checkpoint::verify(&last).unwrap(),
                    "kill {kill}: {}",
                    last.display()
                );
                checkpoint::load_trainable(&last, &Device::Cpu)
                    .unwrap_or_else(|e| panic!("kill {kill}: {e}"));
                steps_seen.insert(TrainerState::load(&last).unwrap().step);
                if out.join(files::CONFIG).exists() {
                    assert!(checkpoint::verify(&out).unwrap());
                    checkpoint::load_model(&out, &Device::Cpu).unwrap();
                }
            }
            Err(e) => {
                // Killed before the first state was complete.
                before_first += 1;
                assert!(
                    !out.exists() || checkpoint::state_dirs(&out).unwrap().is_empty(),
                    "kill {kill}: {e}"
                );
            }
        }
        // A copy of what the kill left (the stale lock and temporary directories included)
        // resumes to the uninterrupted run's weights.
        let copy = root.path().join(format!("copy-{kill}"));
        copy_tree(&work, &copy);
        train(&copy.join("out"));
        assert_eq!(
            final_files(&copy.join("out")),
            want,
            "kill {kill}: resumed weights"
        );
        assert_eq!(
            leftovers(&copy, &copy.join("out")),
            0,
            "kill {kill}: cleaned up"
        );
        std::fs::remove_dir_all(&copy).unwrap();
        if status.success() {
            // Start again, so that the kills keep landing mid-run.
            std::fs::remove_dir_all(&work).unwrap();
            std::fs::create_dir_all(&work).unwrap();
        } else {
            kill += 1;
        }
    }
    println!(
        "{KILLS} kills over a {:.2} s run: {with_leftovers} left a checkpoint write half done, \
         {before_first} came before the first state ({finished} more runs finished before \
         their kill); states resumed from: {steps_seen:?}",
        run_time.as_secs_f64()
    );
    assert!(
        with_leftovers > 0,
        "no kill landed during a checkpoint write"
    );
}
