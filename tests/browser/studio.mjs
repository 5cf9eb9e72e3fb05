// The studio flow in a real headless Chromium (playwright-core driving the system browser):
// create two characters with portraits, write a three-caption story with a pronoun, generate
// it and watch the frames appear, redraw one frame, open its cross-attention heatmaps, redraw
// the frames drawn from its old version, restore that version from the frame's history, cancel
// a run, continue the story by a frame the model writes, export the ZIP, and check labels and the page at phone width. Run by tests/browser.rs against a live server:
//   node tests/browser/studio.mjs BASE_URL
// Environment: CHROMIUM (browser binary), PORTRAITS (directory with tom.png and mia.png).
import { chromium } from "playwright-core";
import assert from "node:assert/strict";
import path from "node:path";

const base = process.argv[2];
const portraits = process.env.PORTRAITS;
const step = (what) => console.log(`- ${what}`);

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--disable-background-networking", "--no-first-run"],
});
const context = await browser.newContext({ acceptDownloads: true, viewport: { width: 1200, height: 900 } });
const page = await context.newPage();
page.setDefaultTimeout(30_000);
const pageErrors = [];
page.on("pageerror", (e) => pageErrors.push(String(e)));

// Content-Security-Policy violations are script errors too: the studio must need no inline code.
page.on("console", (msg) => {
  if (msg.type() === "error" && /Content Security Policy/i.test(msg.text())) pageErrors.push(msg.text());
});

try {
  step("sign in: the studio sends to the login page and back");
  await page.goto(base + "/");
  await page.locator("#login-name").waitFor();
  assert.match(page.url(), /\/login\?next=%2F$/);
  await page.fill("#login-name", process.env.STUDIO_USER);
  await page.fill("#login-password", "not the password");
  await page.click("#login-submit");
  await page.locator("#login-error", { hasText: "do not match" }).waitFor();
  await page.fill("#login-password", process.env.STUDIO_PASSWORD);
  await page.click("#login-submit");
  await page.locator("#add-character").waitFor();
  assert.equal(new URL(page.url()).pathname, "/");

  step("a refused name stops being marked wrong once it is typed");
  await page.click("#add-character");
  await page.locator("#character-name-error", { hasText: "must not be empty" }).waitFor();
  assert.equal(await page.getAttribute("#character-name", "aria-invalid"), "true");
  await page.fill("#character-name", "T");
  assert.equal((await page.locator("#character-name-error").innerText()).trim(), "");
  assert.equal(await page.getAttribute("#character-name", "aria-invalid"), null);
  await page.fill("#character-name", "");

  step("create two characters with portraits, drafting the story in between");
  const addCharacter = async (name, pronoun, file) => {
    await page.fill("#character-name", name);
    await page.selectOption("#character-pronoun", pronoun);
    await page.setInputFiles("#character-portrait", path.join(portraits, file));
    await page.locator("#character-portrait-preview").waitFor({ state: "visible" });
    await page.click("#add-character");
    await page.locator("#character-list .card", { hasText: name }).waitFor();
    // The Stories section reloads with the new cast choice.
    await page.locator("#stories label.check", { hasText: name }).waitFor();
  };
  await addCharacter("Tom", "he", "tom.png");
  await page.fill("#story-title", "In the garden");
  await page.fill("#story-captions", "Tom walks into the garden.\nHe waves at Mia.\nThey laugh together.");
  // The captions name Tom: his box is ticked for the user.
  await page.locator("#story-draft-notes", { hasText: "Named in the captions: Tom." }).waitFor();
  await page.locator("#stories label.check", { hasText: "Tom" }).locator("input:checked").waitFor();
  await addCharacter("Mia", "she", "mia.png");
  assert.equal(await page.locator("#character-list .card").count(), 2);

  step("write a three-caption story with a pronoun");
  // Adding Mia reloaded the Stories section; the draft survived it.
  assert.equal(await page.inputValue("#story-title"), "In the garden");
  assert.match(await page.inputValue("#story-captions"), /^Tom walks into the garden\.\nHe waves/);
  assert.ok(await page.locator("#stories label.check", { hasText: "Tom" }).locator("input").isChecked());
  // Mia, added after the captions named her, is ticked too once the notes come back.
  await page.locator("#story-draft-notes", { hasText: "Named in the captions: Tom, Mia." }).waitFor();
  await page.locator("#stories label.check", { hasText: "Mia" }).locator("input:checked").waitFor();
  await page.locator("#stories form[hx-post='/ui/stories'] button[type=submit]").click();
  await page.locator("#stories a.title", { hasText: "In the garden" }).click();
  await page.waitForURL(/\/stories\/\d+/);
  assert.equal(await page.locator("#caption-list .caption-item").count(), 3);
  // The pronoun is highlighted with the character it refers to.
  const second = page.locator("#caption-list .caption-item").nth(1).locator(".highlight");
  await assert.doesNotReject(second.locator("mark").first().waitFor());
  assert.match(await second.innerText(), /Tom/);

  step("generate and watch the frames appear");
  await page.fill("#generate-steps", "25");
  await page.click("#generate-story");
  await page.locator("#generate-progress").waitFor();
  const seen = new Set();
  const stepTotals = new Set();
  let sawEta = false;
  let sawPreview = false;
  let stepsMoved = false;
  const deadline = Date.now() + 120_000;
  for (;;) {
    const images = await page.locator("#frames-strip li.frame a.frame-open img").count();
    seen.add(images);
    const stepValue = await page.locator("#steps-progress").evaluate((el) => el.value).catch(() => 0);
    if (stepValue > 0) stepsMoved = true;
    if (await page.locator("#frames-strip img.live-preview").count() > 0) sawPreview = true;
    const eta = await page.locator("#job-eta").innerText().catch(() => "");
    if (/^Done in (about \d+ (s|min)|under a second)\.$/.test(eta)) sawEta = true;
    const total = await page.locator("#steps-progress").getAttribute("max").catch(() => null);
    if (total && stepValue > 0) stepTotals.add(total);
    if (images === 3) break;
    assert.ok(Date.now() < deadline, `frames did not all appear (seen image counts ${[...seen]})`);
    await page.waitForTimeout(100);
  }
  assert.ok(seen.has(1) || seen.has(2), `frames should appear one by one; saw counts ${[...seen]}`);
  assert.ok(stepsMoved, "the step progress bar never moved");
  // 25 steps asked for read "of 25" (PNDM's extra warm-up timestep is not a step).
  assert.deepEqual([...stepTotals], ["25"]);
  assert.ok(sawEta, "the panel estimated the time left from the measured steps");
  assert.ok(sawPreview, "a live preview of a frame being drawn was shown");
  await page.locator("#generate-status", { hasText: "Done" }).waitFor();
  await page.locator("#generate-story").waitFor();
  for (let i = 0; i < 3; i++) {
    const seed = (await page.locator(`#frame-${i} .frame-seed`).innerText()).trim();
    assert.match(seed, /^\d+$/, `frame ${i + 1} shows its seed`);
  }

  step("view the frames full size, moving with the arrow keys, and download one");
  await page.click("#view-1");
  const viewer = page.locator("#frame-viewer");
  await viewer.waitFor({ state: "visible" });
  assert.equal(await page.locator("#viewer-title").innerText(), "Frame 2 of 3");
  assert.match(await page.locator("#viewer-caption").innerText(), /He waves at Mia/);
  const shownWidth = await page.locator("#viewer-image").evaluate((img) => img.getBoundingClientRect().width);
  assert.ok(shownWidth >= 256, `the viewer enlarges the 64 px frame (${shownWidth} px)`);
  await page.keyboard.press("ArrowRight");
  assert.equal(await page.locator("#viewer-title").innerText(), "Frame 3 of 3");
  assert.ok(await page.locator("#viewer-next").isDisabled());
  await page.keyboard.press("ArrowLeft");
  await page.keyboard.press("ArrowLeft");
  assert.equal(await page.locator("#viewer-title").innerText(), "Frame 1 of 3");
  assert.equal(await page.getAttribute("#viewer-download", "download"), "frame-01.png");
  await page.keyboard.press("Escape");
  await viewer.waitFor({ state: "hidden" });
  const [png] = await Promise.all([page.waitForEvent("download"), page.click("#download-2")]);
  assert.equal(png.suggestedFilename(), "frame-03.png");
  const pngBytes = (await import("node:fs")).readFileSync(await png.path());
  assert.equal(pngBytes.subarray(1, 4).toString("latin1"), "PNG");

  step("redraw the second frame with a new seed");
  const seedBefore = (await page.locator("#frame-1 .frame-seed").innerText()).trim();
  const srcBefore = await page.locator("#frame-1 img").getAttribute("src");
  await page.click("#regenerate-1");
  await page.waitForFunction(
    ([before]) => {
      const el = document.querySelector("#frame-1 .frame-seed");
      const li = document.querySelector("#frame-1");
      return el && li && el.textContent.trim() !== before && li.dataset.status === "ready";
    },
    [seedBefore],
    { timeout: 60_000 },
  );
  assert.ok(await page.locator("#frame-1 img").getAttribute("src"), "frame 2 still has an image");
  assert.ok(srcBefore);

  step("see where the model looked for each character");
  await page.click("#attention-1");
  assert.equal(await page.locator("#attention-1").getAttribute("aria-pressed"), "true");
  const overlay = page.locator("#frame-1 .attention-overlay");
  await overlay.waitFor();
  await page.waitForFunction(() => {
    const img = document.querySelector("#frame-1 .attention-overlay");
    return img && img.complete && img.naturalWidth > 0;
  });
  // "He waves at Mia.": one view per mention, the pronoun labelled with whom it refers to.
  const view = page.locator("#attention-view-1");
  await assert.doesNotReject(view.locator("button", { hasText: "Mia" }).first().waitFor());
  assert.match(await view.innerText(), /Tom/);
  await view.locator("button", { hasText: "Mia" }).first().click();
  await page.keyboard.press("Escape");
  await overlay.waitFor({ state: "detached" });
  assert.equal(await page.locator("#attention-1").getAttribute("aria-pressed"), "false");

  step("the third frame was drawn from the old second frame: redraw the rest");
  await page.locator("#older-context-2").waitFor();
  assert.equal(await page.locator("#older-context-0").count(), 0);
  assert.equal(await page.locator("#older-context-1").count(), 0);
  const thirdSeed = (await page.locator("#frame-2 .frame-seed").innerText()).trim();
  await page.click("#redraw-rest");
  await page.waitForFunction(() => {
    const li = document.querySelector("#frame-2");
    return li && li.dataset.status === "ready" && !document.querySelector("#older-context")
      && !document.querySelector("#older-context-2");
  }, null, { timeout: 60_000 });
  assert.equal((await page.locator("#frame-2 .frame-seed").innerText()).trim(), thirdSeed,
               "redrawn with its own seed: only the context changed");

  step("frame history: the second frame's two versions, and the first restored");
  assert.equal((await page.locator("#history-1").innerText()).trim(), "History (2)");
  await page.click("#history-1");
  await page.locator("h1", { hasText: "History of frame 2" }).waitFor();
  assert.equal(await page.locator("ol.versions li.version").count(), 2);
  assert.equal(await page.locator("ol.versions li.version.current").count(), 1);
  const oldSeed = (await page.locator("ol.versions li.version:not(.current) .version-seed").innerText()).trim();
  assert.equal(oldSeed, seedBefore, "the first version keeps its seed");
  await page.locator("ol.versions li.version:not(.current) button", { hasText: "Restore" }).click();
  await page.locator("#frame-1").waitFor();
  assert.equal((await page.locator("#frame-1 .frame-seed").innerText()).trim(), seedBefore);
  // Frame 3 was drawn from the version just replaced.
  await page.locator("#older-context-2").waitFor();
  await page.locator("#older-context", { hasText: "Frame 3 was drawn from an older" }).waitFor();

  step("cancel a running generation; finished frames stay");
  await page.fill("#generate-steps", "200");
  await page.click("#generate-story");
  await page.locator("#cancel-job").waitFor();
  await page.waitForFunction(() => Number(document.querySelector("#steps-progress")?.value || 0) > 0,
                             null, { timeout: 60_000 });
  await page.click("#cancel-job");
  await page.locator("#generate-status", { hasText: "Cancelled" }).waitFor({ timeout: 60_000 });
  assert.equal(await page.locator("#frames-strip li.frame a.frame-open img").count(), 3);

  step("continue the story: the model writes a fourth caption and draws it");
  await page.locator("#generate-story").waitFor();
  assert.match(await page.locator("#generate-size-note").innerText(), /64x64 pixels: the only size/);
  await page.fill("#generate-steps", "5");
  await page.selectOption("#generate-scheduler", "ddim");
  await page.fill("#generate-negative", "blurry");
  await page.fill("#continue-frames", "1");
  await page.click("#continue-story");
  await page.waitForFunction(
    () => document.querySelectorAll("#frames-strip li.frame a.frame-open img").length === 4
      && document.querySelector("#frame-3")?.dataset.status === "ready",
    null, { timeout: 60_000 });
  await page.locator("#generate-status", { hasText: "Done" }).waitFor();
  await page.waitForFunction(() => document.querySelectorAll("#caption-list li.caption-item").length === 4);
  assert.ok((await page.locator("#frame-3 figcaption").innerText()).trim().length > 3, "a written caption");
  // Its history records the panel's options.
  await page.click("#history-3");
  await page.locator("h1", { hasText: "History of frame 4" }).waitFor();
  const recipe = await page.locator("ol.versions li.version.current").innerText();
  assert.match(recipe, /5 steps, guidance [\d.]+, ddim/);
  assert.match(recipe, /Negative prompt\s+blurry/);
  // A fresh page, not the browser's Back (which may show a copy from before frame 4).
  await page.click("a:has-text('Back to the story')");
  await page.locator("#frame-3").waitFor();

  step("export the ZIP");
  const [download] = await Promise.all([page.waitForEvent("download"), page.click("#export-zip")]);
  const zipPath = await download.path();
  const bytes = (await import("node:fs")).readFileSync(zipPath);
  assert.equal(bytes.subarray(0, 2).toString("latin1"), "PK", "a ZIP archive");
  const text = bytes.toString("latin1");
  for (const name of ["story.json", "frame-01.png", "frame-02.png", "frame-03.png"]) {
    assert.ok(text.includes(name), `the ZIP holds ${name}`);
  }

  step("a long caption: token warning while typing, and the strip's cards keep their size");
  const long = "Tom and Mia walk past the tall green trees near the old stone house by the river. ".repeat(10).trim();
  await page.fill("#new-caption", long);
  await page.locator("#highlight-new .note-truncated", { hasText: "reads only the first 77" }).waitFor();
  assert.equal(await page.inputValue("#new-caption"), long, "nothing is cut from what was typed");
  await page.locator("#new-caption").press("Enter");
  await page.locator("#frames-strip li.frame").nth(4).waitFor();
  // Unclamped, 840 characters in a 13rem card are about 30 lines; clamped, 4.
  const captionHeights = await page.$$eval("#frames-strip li.frame figcaption",
    (els) => els.map((el) => el.getBoundingClientRect().height));
  assert.ok(Math.max(...captionHeights) < 130, `caption heights ${captionHeights}`);
  assert.equal(await page.locator("#frames-strip li.frame").nth(4).locator("figcaption").getAttribute("title"), long);

  step("make an API token on the Account page, see it once, revoke it");
  const storyUrl = page.url();
  await page.click("header.site a:has-text('Account')");
  await page.locator("#account-name", { hasText: process.env.STUDIO_USER }).waitFor();
  await page.fill("#token-name", "browser test");
  await page.click("#create-token");
  const secret = (await page.locator("#new-token").innerText()).trim();
  assert.match(secret, /^sgv_[A-Za-z0-9_-]{40,}$/);
  const revoke = page.locator("table.tokens button", { hasText: "Revoke" });
  await revoke.click();
  await page.locator("table.tokens td", { hasText: "revoked" }).waitFor();
  assert.equal(await page.locator("#new-token").count(), 0, "the secret is shown once");
  await page.goto(storyUrl);
  await page.locator("#frames-strip").waitFor();

  step("every form control has a label; the page fits a phone");
  const unlabelled = await page.$$eval("input:not([type=hidden]), select, textarea, button", (els) =>
    els.filter((el) => {
      if (el.getAttribute("aria-label") || el.getAttribute("aria-labelledby")) return false;
      if (el.tagName === "BUTTON") return !el.textContent.trim();
      return !(el.labels && el.labels.length);
    }).map((el) => el.id || el.name || el.outerHTML.slice(0, 60)));
  assert.deepEqual(unlabelled, []);
  await page.setViewportSize({ width: 390, height: 844 });
  const [overflow, wide] = await page.evaluate(() => [
    document.documentElement.scrollWidth - window.innerWidth,
    Array.from(document.querySelectorAll("body *"))
      .filter((el) => el.getBoundingClientRect().right > window.innerWidth + 1 && !el.closest(".strip"))
      .slice(0, 5).map((el) => `${el.tagName}#${el.id}.${el.className}`),
  ]);
  assert.ok(overflow <= 1, `the story page is ${overflow}px wider than a phone screen: ${wide}`);

  assert.deepEqual(pageErrors, [], "no script errors");
  console.log("browser flow passed");
} catch (e) {
  await page.screenshot({ path: process.env.SCREENSHOT || "/tmp/storygpt-v-browser-failure.png", fullPage: true }).catch(() => {});
  console.error(e);
  process.exitCode = 1;
} finally {
  await browser.close();
}
