//! The per-thread cache of freed large buffers (`netcl::memory`): bounded
//! by its limit, off at a limit of 0, never showing a freed buffer's old
//! values in a result, and private to each thread.
//!
//! The limit is one setting for the whole process, so every test here
//! takes [`LIMIT`] while it sets and relies on it (the tests of this file
//! run in one process, on several threads).

mod common;

use std::sync::{Barrier, Mutex, MutexGuard};

use netcl::functional as F;
use netcl::{Tensor, autograd, memory};

/// Serialises the tests that set the process-wide limit.
static LIMIT: Mutex<()> = Mutex::new(());

fn lock_limit() -> MutexGuard<'static, ()> {
    LIMIT
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

const MIB: usize = 1 << 20;
/// Values in 1 MiB.
const MIB_VALUES: usize = MIB / 4;

/// Deterministic values in [-1, 1) (a 32-bit LCG), different per `seed`.
fn values(len: usize, seed: u32) -> Vec<f32> {
    let mut state = seed.wrapping_mul(2_654_435_761).wrapping_add(12_345);
    (0..len)
        .map(|_| {
            state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (state >> 8) as f32 / (1u32 << 23) as f32 - 1.0
        })
        .collect()
}

fn tensor(shape: &[usize], seed: u32) -> Tensor {
    let len = shape.iter().product();
    Tensor::from_vec(values(len, seed), shape).unwrap()
}

fn leaf(shape: &[usize], seed: u32) -> Tensor {
    tensor(shape, seed).requires_grad_(true)
}

/// Runs `f` on a new thread (whose cache starts empty) and returns its
/// result.
fn on_new_thread<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    std::thread::scope(|s| s.spawn(f).join().unwrap())
}

#[test]
fn a_thread_keeps_at_most_the_limit_of_what_it_frees() {
    let _limit = lock_limit();
    memory::set_buffer_cache_limit(3 * MIB);
    on_new_thread(|| {
        assert_eq!(memory::thread_buffer_cache_bytes(), 0, "a new thread");
        // Twenty 1 MiB tensors freed: three are kept (the newest).
        for seed in 0..20 {
            drop(tensor(&[MIB_VALUES], seed));
            assert!(memory::thread_buffer_cache_bytes() <= 3 * MIB);
        }
        assert_eq!(memory::thread_buffer_cache_bytes(), 3 * MIB);
        // Mixed sizes (a buffer's capacity counts in full) stay within it.
        for (i, len) in [3 * MIB_VALUES / 2, MIB_VALUES / 4, 2 * MIB_VALUES, 20_000]
            .into_iter()
            .cycle()
            .take(40)
            .enumerate()
        {
            drop(tensor(&[len], i as u32));
            let held = memory::thread_buffer_cache_bytes();
            assert!(held <= 3 * MIB, "{held} bytes held, limit {}", 3 * MIB);
        }
        // A buffer larger than the limit is never kept.
        memory::clear_thread_buffer_cache();
        drop(tensor(&[4 * MIB_VALUES], 1));
        assert_eq!(memory::thread_buffer_cache_bytes(), 0);
        // Small buffers (below 64 KiB) are never kept.
        drop(tensor(&[16 * 1024 - 1], 2));
        assert_eq!(memory::thread_buffer_cache_bytes(), 0);
    });
    // At most eight buffers, whatever the limit: twenty 64 KiB buffers
    // leave eight.
    memory::set_buffer_cache_limit(64 * MIB);
    on_new_thread(|| {
        for seed in 0..20 {
            drop(tensor(&[16 * 1024], seed));
        }
        assert_eq!(memory::thread_buffer_cache_bytes(), 8 * 64 * 1024);
    });
    memory::set_buffer_cache_limit(memory::DEFAULT_BUFFER_CACHE_LIMIT);
}

#[test]
fn a_limit_of_zero_keeps_nothing_and_a_lowered_limit_shrinks_the_cache() {
    let _limit = lock_limit();
    memory::set_buffer_cache_limit(0);
    assert_eq!(memory::buffer_cache_limit(), 0);
    on_new_thread(|| {
        for seed in 0..10 {
            let x = leaf(&[64, 64, 64], seed);
            let y = F::layer_norm(&x, &[64], None, None, 1e-5);
            y.sum().backward();
            drop((x, y));
            assert_eq!(memory::thread_buffer_cache_bytes(), 0);
        }
    });
    memory::set_buffer_cache_limit(8 * MIB);
    on_new_thread(|| {
        for seed in 0..8 {
            drop(tensor(&[MIB_VALUES], seed));
        }
        assert_eq!(memory::thread_buffer_cache_bytes(), 8 * MIB);
        // Lowered: the next buffer this thread frees or takes trims the
        // cache to the new limit.
        memory::set_buffer_cache_limit(2 * MIB);
        drop(tensor(&[MIB_VALUES], 99));
        assert_eq!(memory::thread_buffer_cache_bytes(), 2 * MIB);
        memory::set_buffer_cache_limit(0);
        drop(tensor(&[MIB_VALUES], 100));
        let _taken = Tensor::zeros(&[MIB_VALUES]);
        assert_eq!(memory::thread_buffer_cache_bytes(), 0);
    });
    memory::set_buffer_cache_limit(memory::DEFAULT_BUFFER_CACHE_LIMIT);
}

/// Every value and gradient an op case produces, as bits.
type Outputs = Vec<Vec<u32>>;

fn bits(t: &Tensor) -> Vec<u32> {
    t.to_vec().iter().map(|v| v.to_bits()).collect()
}

/// The forward values and the gradients of `inputs` for `out.sum()`
/// weighted by a fixed tensor (so every gradient path is exercised).
fn fwd_bwd(out: &Tensor, inputs: &[&Tensor]) -> Outputs {
    let weights = tensor(out.shape(), 777);
    let loss = (out * &weights).sum();
    let mut all = vec![bits(out)];
    let grads = autograd::grad(&[&loss], inputs).unwrap();
    all.extend(grads.iter().map(bits));
    all
}

/// Ops whose results start from a zeroed (or filled) buffer and write only
/// part of it, or accumulate into it: each case builds its inputs and
/// returns its outputs. Every buffer here is at least 64 KiB, so each one
/// can come from the cache.
/// A named case: builds its inputs, returns its outputs.
type Case = (&'static str, fn() -> Outputs);

fn zero_relying_cases() -> Vec<Case> {
    vec![
        ("zeros and full", || {
            vec![
                bits(&Tensor::zeros(&[300, 300])),
                bits(&Tensor::full(&[64, 1024], 0.5)),
            ]
        }),
        ("conv2d without bias (dx accumulates from zeros)", || {
            let x = leaf(&[4, 8, 32, 32], 1);
            let w = leaf(&[16, 8, 3, 3], 2);
            let y = F::conv2d(&x, &w, None, 2, 1, 1, 1);
            fwd_bwd(&y, &[&x, &w])
        }),
        ("conv2d with bias, grouped", || {
            let x = leaf(&[4, 8, 32, 32], 3);
            let w = leaf(&[8, 4, 3, 3], 4);
            let b = leaf(&[8], 5);
            let y = F::conv2d(&x, &w, Some(&b), 1, 1, 1, 2);
            fwd_bwd(&y, &[&x, &w, &b])
        }),
        ("max_pool2d (the gradient scattered into zeros)", || {
            let x = leaf(&[4, 16, 32, 32], 6);
            let y = F::max_pool2d(&x, 3, Some(2.into()), 1);
            fwd_bwd(&y, &[&x])
        }),
        ("avg_pool2d and adaptive_avg_pool2d", || {
            let x = leaf(&[4, 16, 32, 32], 7);
            let y = F::avg_pool2d(&x, 2, None, 0, true);
            let z = F::adaptive_avg_pool2d(&x, 5);
            let mut out = fwd_bwd(&y, &[&x]);
            out.extend(fwd_bwd(&z, &[&x]));
            out
        }),
        ("layer_norm, rms_norm, batch_norm", || {
            let x = leaf(&[32, 64, 128], 8);
            let w = leaf(&[128], 9);
            let b = leaf(&[128], 10);
            let y = F::layer_norm(&x, &[128], Some(&w), Some(&b), 1e-5);
            let mut out = fwd_bwd(&y, &[&x, &w, &b]);
            let r = F::rms_norm(&x, &[128], Some(&w), Some(1e-6));
            out.extend(fwd_bwd(&r, &[&x, &w]));
            let c = leaf(&[8, 32, 16, 16], 11);
            let n = F::batch_norm(&c, None, None, None, None, true, 0.1, 1e-5).output;
            out.extend(fwd_bwd(&n, &[&c]));
            out
        }),
        ("sum, mean and axis reductions (spread back)", || {
            let x = leaf(&[256, 512], 12);
            let mut out = fwd_bwd(&x.sum().reshape(&[1]), &[&x]);
            out.extend(fwd_bwd(&x.mean().reshape(&[1]), &[&x]));
            out.extend(fwd_bwd(&x.sum_axis(0, true), &[&x]));
            out.extend(fwd_bwd(&x.max_axis(1, false), &[&x]));
            out
        }),
        ("narrow, select, cat, stack (windows of zeros)", || {
            let x = leaf(&[64, 1024], 13);
            let y = leaf(&[64, 1024], 14);
            let mut out = fwd_bwd(&x.narrow(1, 100, 300), &[&x]);
            out.extend(fwd_bwd(&x.select(0, 5), &[&x]));
            out.extend(fwd_bwd(&F::cat(&[&x, &y], 1), &[&x, &y]));
            out.extend(fwd_bwd(&F::stack(&[&x, &y], 0), &[&x, &y]));
            out
        }),
        (
            "embedding (scatter-add into zeros), where_, broadcasting",
            || {
                let weight = leaf(&[1000, 64], 15);
                let ids: Vec<f32> = (0..2048).map(|i| ((i * 7) % 300) as f32).collect();
                let ids = Tensor::from_vec(ids, &[32, 64]).unwrap();
                let mut out = fwd_bwd(&F::embedding(&ids, &weight), &[&weight]);
                let a = leaf(&[256, 256], 16);
                let b = leaf(&[1, 256], 17);
                let cond = Tensor::from_vec(
                    (0..256 * 256).map(|i| (i % 3 == 0) as u8 as f32).collect(),
                    &[256, 256],
                )
                .unwrap();
                out.extend(fwd_bwd(&F::where_(&cond, &a, &b), &[&a, &b]));
                out.extend(fwd_bwd(&(&a + &b), &[&a, &b]));
                out.extend(fwd_bwd(&a.masked_fill(&cond, -2.0), &[&a]));
                out
            },
        ),
        ("matmul and a transposed copy", || {
            let a = leaf(&[128, 256], 18);
            let b = leaf(&[256, 192], 19);
            let mut out = fwd_bwd(&a.matmul(&b), &[&a, &b]);
            out.extend(fwd_bwd(&a.permute(&[1, 0]).reshape(&[256 * 128]), &[&a]));
            out
        }),
    ]
}

/// Fills this thread's cache with NaN-filled buffers of every length in
/// `lens` (at most eight are kept: the last ones given).
fn poison(lens: &[usize]) {
    for &len in lens {
        drop(Tensor::full(&[len], f32::NAN));
    }
}

#[test]
fn reused_buffers_never_show_old_values() {
    let _limit = lock_limit();
    let cases = zero_relying_cases();
    // With the cache off: what each op computes from fresh memory.
    memory::set_buffer_cache_limit(0);
    let want: Vec<Outputs> = on_new_thread(|| cases.iter().map(|(_, case)| case()).collect());
    memory::set_buffer_cache_limit(256 * MIB);
    let (reused, runs) = on_new_thread(|| {
        let (mut reused, mut runs) = (0, 0);
        for ((name, case), want) in cases.iter().zip(&want) {
            // The cache holds buffers of NaN of each length this case
            // produces (and of each output's, so a result reuses one).
            let mut lens: Vec<usize> = want.iter().map(Vec::len).collect();
            lens.sort_unstable();
            lens.dedup();
            for chunk in lens.chunks(4) {
                poison(chunk);
                poison(chunk);
                runs += 1;
                let before = memory::thread_buffer_cache_reuses();
                let got = case();
                reused += usize::from(memory::thread_buffer_cache_reuses() > before);
                assert_eq!(got.len(), want.len(), "{name}");
                for (i, (got, want)) in got.iter().zip(want).enumerate() {
                    assert!(
                        got == want,
                        "{name}: output {i} differs with reused buffers (first difference at {:?})",
                        got.iter().zip(want).position(|(g, w)| g != w)
                    );
                }
            }
        }
        (reused, runs)
    });
    // The check means something only if results did come from the cache:
    // every run of every case took some of its buffers there.
    assert_eq!(reused, runs, "runs that took buffers from the cache");
    memory::set_buffer_cache_limit(memory::DEFAULT_BUFFER_CACHE_LIMIT);
}

#[test]
fn threads_reuse_only_their_own_buffers() {
    let _limit = lock_limit();
    memory::set_buffer_cache_limit(8 * MIB);
    const THREADS: usize = 4;
    const STEPS: usize = 30;
    let barrier = Barrier::new(THREADS);
    let steps = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..THREADS)
            .map(|t| {
                let (barrier, steps) = (&barrier, &steps);
                s.spawn(move || {
                    // Each thread's own data: a layer_norm step and a conv
                    // step, forward and backward.
                    let x = leaf(&[32, 64, 128], 100 + t as u32);
                    let w = leaf(&[128], 200 + t as u32);
                    let b = leaf(&[128], 300 + t as u32);
                    let cx = leaf(&[2, 8, 32, 32], 400 + t as u32);
                    let cw = leaf(&[8, 8, 3, 3], 500 + t as u32);
                    let step = || {
                        let y = F::layer_norm(&x, &[128], Some(&w), Some(&b), 1e-5);
                        let mut out = fwd_bwd(&y, &[&x, &w, &b]);
                        let c = F::conv2d(&cx, &cw, None, 1, 1, 1, 1);
                        out.extend(fwd_bwd(&c, &[&cx, &cw]));
                        out
                    };
                    // The first step runs on fresh memory: nothing freed yet
                    // on this thread.
                    assert_eq!(memory::thread_buffer_cache_bytes(), 0);
                    let first = step();
                    let kept = memory::thread_buffer_cache_bytes();
                    assert!(kept > 0, "thread {t} kept none of its freed buffers");
                    barrier.wait();
                    for i in 0..STEPS {
                        // Every thread at once, each reusing what it freed.
                        assert!(step() == first, "thread {t}, step {i}: a different result");
                        assert!(memory::thread_buffer_cache_bytes() <= 8 * MIB);
                        steps.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    memory::thread_buffer_cache_bytes()
                })
            })
            .collect();
        // Liveness: every worker finishes (or panics) within the patience.
        common::wait_until(common::PATIENCE, "every thread finishing its steps", || {
            workers.iter().all(|w| w.is_finished())
        });
        for (t, worker) in workers.into_iter().enumerate() {
            let held = worker.join().unwrap();
            assert!(held > 0 && held <= 8 * MIB, "thread {t} holds {held} bytes");
        }
    });
    // Another thread's frees never reach this one.
    on_new_thread(|| assert_eq!(memory::thread_buffer_cache_bytes(), 0));
    memory::set_buffer_cache_limit(memory::DEFAULT_BUFFER_CACHE_LIMIT);
}
