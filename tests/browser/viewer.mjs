// Drives the /ui viewer in Debian's chromium (never a downloaded browser).
//   node viewer.mjs <base url> <topic> [screenshot path]
// Opens <base url>/ui, subscribes to <topic> with a filter built in the form, prints READY,
// then reads an event id from stdin, waits for that event on the page, expands it, prints
// FOUND <json> and SCREENSHOT <path>, and exits 0. Every wait is bounded. With
// EVENTWIRE_VIEWER_TOKEN set, the page gets it the way a shared link would (#token=...).
import { chromium } from "playwright-core";
import { createInterface } from "node:readline";
import { tmpdir } from "node:os";
import { join } from "node:path";

const [base, topic, shot = join(tmpdir(), `eventwire-viewer-${process.pid}.png`)] = process.argv.slice(2);
if (!base || !topic) {
  console.error("usage: node viewer.mjs <base url> <topic> [screenshot path]");
  process.exit(2);
}
const WAIT_MS = 20_000;
const overall = setTimeout(() => { console.error("viewer.mjs: overall timeout"); process.exit(3); }, 90_000);

const browser = await chromium.launch({
  executablePath: process.env.EVENTWIRE_CHROMIUM || "/usr/bin/chromium",
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  timeout: WAIT_MS,
});
try {
  const page = await browser.newPage({ viewport: { width: 1200, height: 700 } });
  page.setDefaultTimeout(WAIT_MS);
  page.on("console", (m) => console.error(`console.${m.type()}: ${m.text()}`));
  page.on("pageerror", (e) => console.error(`pageerror: ${e.message}`));
  const ui = new URL("/ui", base);
  if (process.env.EVENTWIRE_VIEWER_TOKEN) ui.hash = "token=" + encodeURIComponent(process.env.EVENTWIRE_VIEWER_TOKEN);
  await page.goto(ui.href);
  await page.fill("#topic", topic);
  // Build the filter with the form: type prefix com.example.order.
  const row = page.locator("#conditions .condition").first();
  await row.locator(".attribute").fill("type");
  await row.locator(".dialect").selectOption("prefix");
  await row.locator(".value").fill("com.example.order.");
  await page.click("#connect");
  await page.waitForSelector('#status[data-state="open"]');
  console.log("READY");

  const lines = createInterface({ input: process.stdin });
  const id = (await lines[Symbol.asyncIterator]().next()).value?.trim();
  lines.close();
  process.stdin.destroy();
  if (!id) throw new Error("no event id on stdin");
  const item = page.locator(`#events li[data-event-id="${id}"]`);
  await item.waitFor();
  await item.locator("summary").click();
  const found = await item.evaluate((li) => ({
    id: li.dataset.eventId,
    trace: li.dataset.traceId,
    type: li.dataset.type,
    partition: Number(li.dataset.partition),
    offset: Number(li.dataset.offset),
    summary: li.querySelector("summary").innerText,
    attributes: Object.fromEntries([...li.querySelectorAll("table.attributes tr")]
      .map((tr) => [tr.cells[0].innerText, tr.cells[1].innerText])),
    data: li.querySelector("pre.data").innerText,
    open: li.querySelector("details").open,
    count: document.querySelectorAll("#events li").length,
    status: document.getElementById("status").innerText,
  }));
  console.log("FOUND " + JSON.stringify(found));
  await page.screenshot({ path: shot, fullPage: true });
  console.log("SCREENSHOT " + shot);
} finally {
  await browser.close();
  clearTimeout(overall);
}
process.exit(0);
