//! `nn::join_cpu_pool`: the calling thread becomes worker 0 of rayon's global pool, our
//! parallel kernels then run partly on it, and their results do not change; `nn::on_cpu_pool`
//! runs another thread's work on the pool. Its own test binary,
//! because the global pool is built once per process.

use nn::candle_core::{Device, Tensor};
use std::sync::atomic::{AtomicUsize, Ordering};

/// A deterministic tensor (no RNG: the same values in every call).
fn filled(shape: &[usize], phase: f32) -> Tensor {
    let n: usize = shape.iter().product();
    let data: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37 + phase).sin()).collect();
    Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
}

/// A linear layer and a convolution, both large enough that our kernels split them over the
/// pool's threads.
fn linear_and_conv() -> (Vec<f32>, Vec<f32>) {
    let linear = nn::Linear::from_tensors(filled(&[72, 160], 0.5), Some(filled(&[72], 1.5)));
    let y = linear.forward(&filled(&[96, 160], 0.0)).unwrap();
    let conv = nn::Conv2d::from_tensors(
        filled(&[16, 8, 3, 3], 2.5),
        Some(filled(&[16], 3.5)),
        nn::Conv2dConfig {
            padding: 1,
            ..Default::default()
        },
    );
    let z = conv.forward(&filled(&[4, 8, 24, 24], 4.5)).unwrap();
    (
        y.flatten_all().unwrap().to_vec1().unwrap(),
        z.flatten_all().unwrap().to_vec1().unwrap(),
    )
}

#[test]
fn the_main_thread_joins_the_pool_and_results_do_not_change() {
    // Before joining: the same work on a pool of our own, so the global pool stays unbuilt.
    let before = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap()
        .install(linear_and_conv);

    assert_eq!(rayon::current_thread_index(), None);
    assert!(nn::join_cpu_pool(), "the global pool existed already");
    assert_eq!(rayon::current_thread_index(), Some(0));
    assert_eq!(
        rayon::current_num_threads(),
        nn::candle_core::utils::get_num_threads()
    );
    // The pool cannot be built twice, and a second call says so.
    assert!(!nn::join_cpu_pool());

    let after = linear_and_conv();
    assert_eq!(before.0, after.0, "the linear layer's output changed");
    assert_eq!(before.1, after.1, "the convolution's output changed");

    // Parallel work started on this thread now runs partly on it.
    if rayon::current_num_threads() > 1 {
        let on_this_thread = AtomicUsize::new(0);
        use rayon::prelude::*;
        (0..64).into_par_iter().for_each(|_| {
            if rayon::current_thread_index() == Some(0) {
                on_this_thread.fetch_add(1, Ordering::Relaxed);
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        });
        assert!(on_this_thread.load(Ordering::Relaxed) > 0);
    }

    // Another thread (the service's generation worker) cannot join: `on_cpu_pool` runs its
    // work on a pool thread instead, with the same results; in place when the pool has one
    // thread.
    let (index, elsewhere) = std::thread::spawn(|| {
        nn::on_cpu_pool(|| (rayon::current_thread_index(), linear_and_conv()))
    })
    .join()
    .unwrap();
    if rayon::current_num_threads() > 1 {
        assert!(index.is_some(), "the work did not run on a pool thread");
    } else {
        assert_eq!(index, None);
    }
    assert_eq!(before, elsewhere);
    // On a pool thread already, it runs in place.
    assert_eq!(nn::on_cpu_pool(rayon::current_thread_index), Some(0));

    // Another process shares the cores (`train all`'s second lane): work runs on a narrower
    // pool of its own, with the same results, until the cores are ours again.
    nn::share_cpu_cores(Some(1)).unwrap();
    let (threads, name, shared) = nn::on_shared_cores(|| {
        (
            rayon::current_num_threads(),
            std::thread::current().name().map(str::to_owned),
            linear_and_conv(),
        )
    });
    assert_eq!(threads, 1);
    assert_eq!(name.as_deref(), Some("shared-cores-0"));
    assert_eq!(before, shared);
    nn::share_cpu_cores(None).unwrap();
    let (threads, index) =
        nn::on_shared_cores(|| (rayon::current_num_threads(), rayon::current_thread_index()));
    assert_eq!(threads, nn::candle_core::utils::get_num_threads());
    assert_eq!(
        index,
        Some(0),
        "back on this thread, worker 0 of the global pool"
    );
}
