// A person's visit to onebox's page, in Debian's chromium driven by Playwright.
// tests/test_page.py runs it against a real stack started with API_TOKEN=TOKEN:
//
//   node page.mjs BASE_URL SCREENSHOT.png TOKEN [CHROMIUM]
//
// It exits 0 and prints one JSON line of task ids when every step held, or
// exits 1 saying which step failed. Either way SCREENSHOT.png shows the page:
// with a task in each state, or at the moment of the failure.
import { chromium } from "playwright-core";

const [base, screenshot, token, executablePath = "/usr/bin/chromium"] = process.argv.slice(2);
if (!base || !screenshot || !token) {
  console.error("usage: node page.mjs BASE_URL SCREENSHOT.png TOKEN [CHROMIUM]");
  process.exit(2);
}

function check(condition, message) {
  if (!condition) throw new Error(message);
}

function step(description) {
  console.error(`step: ${description}`);
}

// Start a countdown through the form; its id and the row the page shows for it.
async function start(page, seconds) {
  await page.getByLabel("Seconds").fill(String(seconds));
  const [response] = await Promise.all([
    page.waitForResponse((r) => r.request().method() === "POST" && new URL(r.url()).pathname === "/tasks"),
    page.getByRole("button", { name: "Start" }).click(),
  ]);
  check(response.status() === 202, `POST /tasks answered ${response.status()}: ${await response.text()}`);
  const { id } = await response.json();
  const row = page.getByRole("row").filter({ has: page.getByTitle(id, { exact: true }) });
  return { id, row };
}

// Start a job through the API, as another client would; the page finds it by itself.
async function startJob(page, name, body) {
  const response = await page.request.post(`${base}/jobs/${name}`, {
    data: body,
    headers: { Authorization: `Bearer ${token}` },
  });
  check(response.status() === 202, `POST /jobs/${name} answered ${response.status()}: ${await response.text()}`);
  const { id } = await response.json();
  const row = page.getByRole("row").filter({ has: page.getByTitle(id, { exact: true }) });
  return { id, row };
}

async function waitForStatus(row, status) {
  await row.getByRole("cell", { name: status, exact: true }).waitFor();
}

async function progress(row) {
  return row.getByRole("progressbar").evaluate((bar) => ({ value: bar.value, max: bar.max }));
}

// The bar moves while the person watches, with no reload.
async function waitForProgress(page, row, atLeast) {
  const bar = await row.getByRole("progressbar").elementHandle();
  await page.waitForFunction(([bar, least]) => bar.value >= least, [bar, atLeast]);
}

async function visit(page) {
  const problems = [];
  page.on("pageerror", (error) => problems.push(`uncaught: ${error.message}`));
  page.on("console", (message) => {
    // Chromium logs the 401 that the first Start meets on purpose.
    if (message.type() === "error" && !message.text().includes("status of 401")) {
      problems.push(`console: ${message.text()}`);
    }
  });

  await page.goto(base);
  await page.getByText("No tasks yet.").waitFor();

  step("Start without the token shows the server's 401 detail");
  await page.getByRole("button", { name: "Start" }).click();
  const alert = page.getByRole("alert");
  await alert.getByText("a valid bearer token is required").waitFor();

  step("with the token, a 3-second countdown runs to succeeded with a full bar");
  await page.getByLabel("API token").fill(token);
  const short = await start(page, 3);
  await alert.waitFor({ state: "hidden" });
  const long = await start(page, 30);
  await waitForStatus(short.row, "succeeded");
  const full = await progress(short.row);
  check(full.max === 3 && full.value === 3, `the succeeded task's bar is at ${full.value} of ${full.max}`);
  check(await short.row.getByRole("button", { name: "Cancel" }).isHidden(), "a succeeded task offers Cancel");

  step("a 30-second countdown moves live, and Cancel stops it");
  await waitForStatus(long.row, "running");
  await waitForProgress(page, long.row, 1);
  await long.row.getByRole("button", { name: "Cancel" }).click();
  await waitForStatus(long.row, "cancelled");
  const stopped = await progress(long.row);
  check(stopped.value < stopped.max, `the cancelled task's bar is full (${stopped.value} of ${stopped.max})`);
  await long.row.getByRole("button", { name: "Cancel" }).waitFor({ state: "hidden" });

  step("after a reload the page lists the tasks newest first and follows the running one");
  const running = await start(page, 20);
  await page.reload();
  await running.row.waitFor();
  const rows = page.getByRole("row").filter({ has: page.getByRole("progressbar") });
  const listed = await rows.evaluateAll((trs) => trs.map((tr) => tr.cells[0].title));
  const expected = [running.id, long.id, short.id];
  check(JSON.stringify(listed) === JSON.stringify(expected), `rows ${listed}; expected ${expected}`);
  await waitForStatus(short.row, "succeeded");
  await waitForStatus(long.row, "cancelled");
  await waitForProgress(page, running.row, 2);
  await waitForStatus(running.row, "running");

  step("a tally job started elsewhere appears, and shows its progress, message and result");
  const tally = await startJob(page, "tally", { title: "fruit", words: ["apple", "pear", "apple"] });
  await tally.row.getByRole("cell", { name: "tally", exact: true }).waitFor();
  await waitForProgress(page, tally.row, 1);
  await tally.row.getByText(/^counting '(pear|apple)'$/).waitFor();
  await waitForStatus(tally.row, "succeeded");
  await tally.row.getByText('{"title":"fruit","counts":{"apple":2,"pear":1}}', { exact: true }).waitFor();
  const counted = await progress(tally.row);
  check(counted.max === 3 && counted.value === 3, `the tally's bar is at ${counted.value} of ${counted.max}`);

  step("a failing tally job shows its error, and fails at its second attempt");
  const failing = await startJob(page, "tally", { title: "oops", words: ["fail"] });
  await waitForStatus(failing.row, "failed");
  await failing.row.getByText("ValueError: oops: cannot count 'fail' (attempt 2)", { exact: true }).waitFor();
  await waitForStatus(running.row, "running");
  await page.screenshot({ path: screenshot, fullPage: true });

  // A browser opens six connections to a server at most; were each task to
  // hold a stream, Start would hang here.
  step("with more tasks than the page streams, Start still answers and every row reaches succeeded");
  // The page keeps no secret: a reload forgets the token.
  await page.getByLabel("API token").fill(token);
  const crowd = [];
  for (let i = 0; i < 6; i += 1) crowd.push(await start(page, 2));
  for (const task of crowd) await waitForStatus(task.row, "succeeded");

  check(problems.length === 0, `the page reported errors:\n${problems.join("\n")}`);
  return {
    succeeded: short.id,
    cancelled: long.id,
    running: running.id,
    tally: tally.id,
    failing: failing.id,
    crowd: crowd.map((task) => task.id),
  };
}

const browser = await chromium.launch({
  executablePath,
  args: [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
  ],
});
let failed = false;
try {
  const context = await browser.newContext({
    viewport: { width: 1100, height: 400 },
    deviceScaleFactor: 2,
    locale: "en-GB",
    timezoneId: "UTC",
  });
  context.setDefaultTimeout(15_000);
  const page = await context.newPage();
  try {
    console.log(JSON.stringify(await visit(page)));
  } catch (error) {
    failed = true;
    console.error(`page test failed: ${error.message}`);
    await page.screenshot({ path: screenshot, fullPage: true }).catch(() => {});
  }
} finally {
  await browser.close();
}
process.exit(failed ? 1 : 0);
