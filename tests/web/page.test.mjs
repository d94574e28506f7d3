// Drives the edgefn page in Debian's headless Chromium with playwright-core.
// Usage: node page.test.mjs URL TOKEN ARTIFACTS_DIR IMAGE
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
  // The classify camera's tile shows its label instead of an image.
  await page.waitForFunction(() => [...document.querySelectorAll(".tile .label")]
    .some((l) => !l.hidden && /^(Egyptian cat|espresso) \(\d+ %\)$/.test(l.textContent)
      && l.parentElement.querySelector("img").offsetHeight === 0), null, { timeout: 20000 });
  const before = await page.$$eval(".tile", (ts) => ts.map((t) => [t.dataset.camera, +t.dataset.results]));
  check(before.length === 3, "expected 3 camera tiles, got " + JSON.stringify(before));
  await page.waitForFunction((b) => b.every(([cam, n]) => {
    const t = document.querySelector(`.tile[data-camera="${cam}"]`);
    return t && +t.dataset.results > n;
  }), before, { timeout: 15000 });

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
