//! Issue #18, item 2: portrait uploads are bounded before any work is done on them. A small
//! file declaring a huge image is refused from its header, without the server's memory
//! growing, even when many arrive at once; a JPEG or PNG whose data ends early is refused
//! rather than stored with filler pixels; normal portraits still work, through the API and
//! the HTML form.

mod support;

use std::time::{Duration, Instant};

use image::{ImageEncoder, ImageFormat};
use support::{encode, png_header_claiming, start_server};

#[test]
#[ignore = "the server process the other tests start (runs only as a child process)"]
fn child_server() {
    support::child_server_main();
}

/// How much the server's resident memory may grow while bomb uploads are refused. Before the
/// fix each one below cost about 250 MB (a 128 MiB pixel buffer, then re-encoding it).
const RSS_GROWTH_BOUND_MIB: u64 = 100;

/// The decompression bomb of issue #18: a complete, valid 4096x4096 16-bit RGBA PNG of zeros,
/// about 130 KB that decode to 128 MiB.
fn bomb_png() -> Vec<u8> {
    let zeros = vec![0u8; 4096 * 4096 * 8];
    let mut out = Vec::new();
    image::codecs::png::PngEncoder::new_with_quality(
        &mut out,
        image::codecs::png::CompressionType::Best,
        image::codecs::png::FilterType::NoFilter,
    )
    .write_image(&zeros, 4096, 4096, image::ExtendedColorType::Rgba16)
    .unwrap();
    out
}

#[test]
#[cfg_attr(
    not(target_os = "linux"),
    ignore = "reads the server's memory use from /proc"
)]
fn bomb_uploads_in_parallel_are_refused_without_raising_the_servers_memory() {
    let bomb = bomb_png();
    assert!(bomb.len() < 1024 * 1024, "the bomb is {} bytes", bomb.len());
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path());
    // Warm up: one normal upload, so the allocator and the blocking pool exist.
    let ok = server.post_character("Warm", &encode(64, 48, ImageFormat::Png));
    assert_eq!(ok.status, 201, "{}", ok.text());

    let baseline_kb = server.proc_status_kb("VmRSS");
    // Reset the peak (VmHWM) to the current size where the kernel allows it; the sampler
    // below catches the peak either way, unless it is shorter than its period.
    let hwm_reset = std::fs::write(format!("/proc/{}/clear_refs", server.pid()), "5").is_ok();
    let done = std::sync::atomic::AtomicBool::new(false);
    let (peak_kb, answers) = std::thread::scope(|scope| {
        let sampler = scope.spawn(|| {
            let mut peak = 0;
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                peak = peak.max(server.proc_status_kb("VmRSS"));
                std::thread::sleep(Duration::from_millis(2));
            }
            peak
        });
        let uploads: Vec<_> = (0..8)
            .map(|i| {
                let (server, bomb) = (&server, &bomb);
                scope.spawn(move || {
                    let started = Instant::now();
                    let answer = server.post_character(&format!("Bomb {i}"), bomb);
                    (answer, started.elapsed())
                })
            })
            .collect();
        let answers: Vec<_> = uploads.into_iter().map(|u| u.join().unwrap()).collect();
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        let mut peak = sampler.join().unwrap();
        if hwm_reset {
            peak = peak.max(server.proc_status_kb("VmHWM"));
        }
        (peak, answers)
    });
    let growth_mib = peak_kb.saturating_sub(baseline_kb) / 1024;
    println!(
        "server RSS: {baseline_kb} kB before the bombs, peak {peak_kb} kB (+{growth_mib} MiB; \
         VmHWM reset: {hwm_reset})"
    );
    assert!(
        growth_mib <= RSS_GROWTH_BOUND_MIB,
        "8 bomb uploads raised the server's RSS by {growth_mib} MiB (from {baseline_kb} kB \
         to a peak of {peak_kb} kB); the bound is {RSS_GROWTH_BOUND_MIB} MiB"
    );
    for (answer, took) in &answers {
        let detail = answer.problem(422, "image_too_large");
        assert!(detail.contains("4096x4096 px"), "{detail}");
        assert!(
            detail.contains("at most 4096 px a side and 16 megapixels"),
            "{detail}"
        );
        assert!(*took < Duration::from_secs(10), "took {took:?}");
    }
    // Nothing was stored, and the server still works.
    let characters = server.get_json("/api/characters");
    assert_eq!(
        characters["items"].as_array().unwrap().len(),
        1,
        "{characters}"
    );
}

#[test]
fn uploads_are_checked_from_the_header_and_must_be_complete() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path());

    // Normal portraits still work: PNG and JPEG.
    let png = server.post_character("Fred", &encode(64, 48, ImageFormat::Png));
    assert_eq!(png.status, 201, "{}", png.text());
    assert_eq!(png.json()["portrait"]["width"], 64, "{}", png.text());
    let jpeg = server.post_character("Wilma", &encode(120, 90, ImageFormat::Jpeg));
    assert_eq!(jpeg.status, 201, "{}", jpeg.text());

    // A 57-byte PNG declaring 4096x4096 16-bit RGBA (128 MiB): refused from the header, at
    // once, naming the declared size and the limits.
    let claim = png_header_claiming(4096, 4096, 16, 6);
    let started = Instant::now();
    let answer = server.post_character("Bomb", &claim);
    let took = started.elapsed();
    let detail = answer.problem(422, "image_too_large");
    assert!(detail.contains("4096x4096 px"), "{detail}");
    assert!(detail.contains("16 megapixels"), "{detail}");
    assert!(took < Duration::from_secs(1), "took {took:?}");
    // Within 16 megapixels, but 16-bit RGBA: 122 MiB of pixels, over the 64 MiB budget.
    let detail = server
        .post_character("Bomb", &png_header_claiming(4000, 4000, 16, 6))
        .problem(422, "image_too_large");
    assert!(detail.contains("4000x4000 px"), "{detail}");
    assert!(detail.contains("at most 64 MiB"), "{detail}");
    // The HTML form refuses it too, with the message by the portrait field.
    let form = server.post_character_to("/ui/characters", "Bomb", &claim);
    assert_eq!(form.status, 422, "{}", form.text());
    assert!(form.text().contains("4096x4096 px"), "{}", form.text());

    // Truncated files: the JPEG decoder alone fills what is missing with grey and succeeds.
    let full_jpeg = encode(200, 150, ImageFormat::Jpeg);
    for keep in [full_jpeg.len() - 2, full_jpeg.len() / 2] {
        let detail = server
            .post_character("Cut", &full_jpeg[..keep])
            .problem(422, "invalid_image");
        assert!(detail.contains("truncated"), "{detail}");
    }
    let full_png = encode(200, 150, ImageFormat::Png);
    server
        .post_character("Cut", &full_png[..full_png.len() / 2])
        .problem(422, "invalid_image");
    // A JPEG whose header declares 4000x4000 but that holds a 16x16 image's data.
    let mut lie = encode(16, 16, ImageFormat::Jpeg);
    let sof = lie.windows(2).position(|w| w == [0xFF, 0xC0]).unwrap();
    lie[sof + 5..sof + 7].copy_from_slice(&4000u16.to_be_bytes());
    lie[sof + 7..sof + 9].copy_from_slice(&4000u16.to_be_bytes());
    let detail = server
        .post_character("Lie", &lie)
        .problem(422, "invalid_image");
    assert!(detail.contains("4000x4000"), "{detail}");

    // Only the two good portraits were stored.
    let characters = server.get_json("/api/characters");
    let names: Vec<&str> = characters["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["Fred", "Wilma"], "{characters}");
}
