// Drives the edgefn page in Debian's headless Chromium with playwright-core.
// Usage: node page.test.mjs URL TOKEN ARTIFACTS_DIR IMAGE
// Screenshots: page-phone.png and page-desktop.png (the live board), page.png, page-classify.png
// and page-error.png (uploads), page-failure.png when a check fails.
// Exits non-zero with the failed check on stderr. Called by daemon/tests/web_page.rs.
import { chromium } from "playwright-core";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

const [url, token, artifacts, image] = process.argv.slice(2);
const fail = (msg) => { console.error("page test: " + msg); process.exitCode = 1; throw new Error(msg); };
const check = (ok, msg) => { if (!ok) fail(msg); };

const profile = mkdtempSync(join(tmpdir(), "edgefn-chromium-"));
const context = await chromium.launchPersistentContext(profile, {
  executablePath: "/usr/bin/chromium",
  headless: true,
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-quic"],
  viewport: { width: 390, height: 844 }, // a phone: the board sits in a cabinet
});
const page = context.pages()[0] || await context.newPage();
const errors = [];
page.on("pageerror", (e) => errors.push(String(e)));

try {
  await page.goto(url);
  if (token) {
    // Token auth is on: the page asks for it, then everything works.
    await page.waitForSelector("#auth", { state: "visible", timeout: 10000 });
    await page.fill("#token", token);
    await page.click("#auth button");
  }
  await page.waitForSelector("#h-live.ok", { timeout: 15000 });
  check((await page.textContent("#h-broker")).includes("connected"), "broker pill does not say connected");

  // Two camera tiles with real images (grayscale), then every tile updates from the MQTT feed.
  await page.waitForFunction(() => {
    const imgs = [...document.querySelectorAll(".tile img")].filter((i) => !i.hidden);
    return imgs.length >= 2 && imgs.every((i) => i.complete && i.naturalWidth > 0);
  }, null, { timeout: 20000 });
  // The classify camera's tile shows the frame it classified, captioned with the label.
  await page.waitForFunction(() => {
    const t = document.querySelector('.tile[data-camera="porch"]');
    const img = t && t.querySelector("img"), caption = t && t.querySelector(".caption");
    return img && !img.hidden && img.complete && img.naturalWidth > 0 && img.src.includes("/frame")
      && !caption.hidden && /^(Egyptian cat|espresso) \(\d+ %\)$/.test(caption.textContent);
  }, null, { timeout: 20000 });
  const before = await page.$$eval(".tile", (ts) => ts.map((t) => [t.dataset.camera, +t.dataset.results]));
  check(before.length === 3, "expected 3 camera tiles, got " + JSON.stringify(before));
  await page.waitForFunction((b) => b.every(([cam, n]) => {
    const t = document.querySelector(`.tile[data-camera="${cam}"]`);
    return t && +t.dataset.results > n;
  }), before, { timeout: 15000 });

  // Sparklines: ten minutes of frames/s and latency per camera, and they move with the feed.
  const spark = () => page.$eval('.tile[data-camera="front-door"] .fps polyline', (p) => p.getAttribute("points"));
  const first = await spark();
  check(first.split(" ").length === 60, "a sparkline of " + first.split(" ").length + " points, not 60");
  await page.waitForFunction((f) => {
    const p = document.querySelector('.tile[data-camera="front-door"] .fps polyline');
    return p && p.getAttribute("points") !== f;
  }, first, { timeout: 15000 });
  const lat = await page.$eval('.tile[data-camera="front-door"] .lat', (d) => d.textContent);
  check(/latency \d+ ms/.test(lat), "latency label: " + JSON.stringify(lat));

  // The pipeline view: frames in, each function, results, and each sink with its count.
  await page.waitForFunction(() => {
    const row = document.querySelector('.flow[data-pipeline="demo-gray"]');
    return row && /\d+ received/.test(row.textContent) && row.textContent.includes("grayscale")
      && /[1-9]\d* committed/.test(row.textContent) && /[1-9]\d* dead/.test(row.textContent);
  }, null, { timeout: 20000 });

  // Dead letters from the refusing sidecar topic, with the reason, and a replay button.
  await page.waitForSelector("#dead-list tr", { timeout: 20000 });
  const reason = await page.textContent("#dead-list td.reason");
  check(/403/.test(reason), "dead letter reason: " + JSON.stringify(reason));
  await page.setViewportSize({ width: 1280, height: 900 });
  await page.screenshot({ path: join(artifacts, "page-desktop.png"), fullPage: true });
  await page.setViewportSize({ width: 390, height: 844 });
  await page.screenshot({ path: join(artifacts, "page-phone.png"), fullPage: true });
  // At a phone's width nothing runs off the right edge (the pipeline view and the notice did).
  const wide = await page.evaluate(() => {
    const w = document.documentElement.clientWidth;
    const over = [...document.querySelectorAll("body *")].filter((e) => {
      const r = e.getBoundingClientRect();
      return r.width > 0 && r.height > 0 && (r.right > w + 0.5 || r.left < -0.5);
    }).map((e) => `${e.tagName.toLowerCase()}${e.id ? "#" + e.id : ""}.${e.className.baseVal ?? e.className} right=${Math.round(e.getBoundingClientRect().right)}`);
    return { w, scroll: document.documentElement.scrollWidth, over: over.slice(0, 8) };
  });
  check(wide.scroll <= wide.w && wide.over.length === 0, "wider than the 390 px window: " + JSON.stringify(wide));

  // The classify tile alternates the cat and the coffee cup at 3 frames/s: every caption seen
  // must sit on its own picture (chelsea.png is 451 px wide, coffee.png 600 px).
  const seen = new Set();
  for (let i = 0; i < 60; i++) {
    const s = await page.$eval('.tile[data-camera="porch"]', (t) => {
      const img = t.querySelector("img"), cap = t.querySelector(".caption");
      return { text: cap.hidden ? "" : cap.textContent, w: img.complete ? img.naturalWidth : 0 };
    });
    if (s.text && s.w) {
      const want = s.text.startsWith("Egyptian cat") ? 451 : s.text.startsWith("espresso") ? 600 : -1;
      check(s.w === want, `caption "${s.text}" on a ${s.w} px wide picture`);
      seen.add(want);
    }
    await page.waitForTimeout(100);
  }
  check(seen.size === 2, "did not see both pictures captioned: " + JSON.stringify([...seen]));
  await page.click("#replay");
  await page.waitForFunction(() => /[1-9]\d* sent back/.test(document.querySelector("#replay-result").textContent), null, { timeout: 15000 });

  // Each function's digest.
  const digests = await page.$$eval("#functions td.digest", (tds) => tds.map((t) => t.textContent));
  check(digests.length > 0 && digests.every((d) => /^[0-9a-f]{12}$/.test(d)), "digests: " + JSON.stringify(digests));

  // Upload a photo to grayscale: a gray image of the same size comes back on the page.
  await page.selectOption("#target", "fn:grayscale");
  await page.setInputFiles("#file", image);
  await page.click("#run");
  await page.waitForSelector("#result-image", { timeout: 15000 });
  const gray = await page.$eval("#result-image", async (img) => {
    await img.decode();
    const c = document.createElement("canvas");
    c.width = img.naturalWidth; c.height = img.naturalHeight;
    const ctx = c.getContext("2d");
    ctx.drawImage(img, 0, 0);
    const d = ctx.getImageData(0, 0, c.width, c.height).data;
    let notGray = 0, levels = new Set();
    for (let i = 0; i < d.length; i += 4) {
      if (d[i] !== d[i + 1] || d[i + 1] !== d[i + 2]) notGray++;
      levels.add(d[i]);
    }
    return { w: c.width, h: c.height, notGray, levels: levels.size };
  });
  check(gray.w === 451 && gray.h === 300, "result size " + gray.w + "x" + gray.h);
  check(gray.notGray === 0, gray.notGray + " pixels are not gray");
  check(gray.levels > 100, "only " + gray.levels + " gray levels: not the photo");
  await page.screenshot({ path: join(artifacts, "page.png"), fullPage: true });

  // Upload the photo to classify: the five best labels, the cat first.
  await page.selectOption("#target", "fn:classify");
  await page.setInputFiles("#file", image);
  await page.click("#run");
  await page.waitForSelector("#result-labels li", { timeout: 15000 });
  const labels = await page.$$eval("#result-labels li", (lis) => lis.map((li) => li.textContent));
  check(labels.length === 5 && labels[0].startsWith("Egyptian cat"), "classify labels: " + JSON.stringify(labels));
  await page.screenshot({ path: join(artifacts, "page-classify.png"), fullPage: true });

  // A non-image shows the daemon's error message in the page, not a blank.
  await page.setInputFiles("#file", { name: "notes.txt", mimeType: "text/plain", buffer: Buffer.from("not a picture") });
  await page.click("#run");
  await page.waitForSelector("#error", { timeout: 15000 });
  const msg = await page.textContent("#error");
  check(msg.includes("rejected its input"), "error shown: " + JSON.stringify(msg));
  await page.screenshot({ path: join(artifacts, "page-error.png"), fullPage: true });
  check(errors.length === 0, "script errors: " + errors.join("; "));
  console.log("page test: ok");
} catch (e) {
  await page.screenshot({ path: join(artifacts, "page-failure.png"), fullPage: true }).catch(() => {});
  if (!process.exitCode) { console.error("page test: " + e.message); process.exitCode = 1; }
} finally {
  await context.close();
  rmSync(profile, { recursive: true, force: true });
}
