// A person's visit to onebox's page, in Debian's chromium driven by Playwright.
// tests/test_page.py runs it against a real stack started with API_TOKEN=TOKEN,
// in two parts with a restart of the stack in between:
//
//   node page.mjs BASE_URL SCREENSHOT.png TOKEN            # the first part
//   node page.mjs BASE_URL SCREENSHOT.png TOKEN 'IDS'      # after the restart
//
// IDS is the line the first part prints: one JSON object of the ids of the
// tasks it started. CHROMIUM in the environment names the browser
// (/usr/bin/chromium if unset). Each part exits 0 (the first printing IDS)
// when every step held, or exits 1 saying which step failed. Either way
// SCREENSHOT.png shows the page: the first part's with a task in each state,
// the second's with the tasks it found after the restart, or the page at the
// moment of the failure.
import { chromium } from "playwright-core";

const [base, screenshot, token, before] = process.argv.slice(2);
if (!base || !screenshot || !token) {
  console.error("usage: node page.mjs BASE_URL SCREENSHOT.png TOKEN [IDS OF THE FIRST PART]");
  process.exit(2);
}
const executablePath = process.env.CHROMIUM || "/usr/bin/chromium";
const REFUSED = "a valid bearer token is required";
const SURVIVOR_SECONDS = 25;

function check(condition, message) {
  if (!condition) throw new Error(message);
}

function step(description) {
  console.error(`step: ${description}`);
}

function rowOf(page, id) {
  return page.getByRole("row").filter({ has: page.getByTitle(id, { exact: true }) });
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
  return { id, row: rowOf(page, id) };
}

// Start a job through the API, as another client would; the page finds it by itself.
async function startJob(page, name, body) {
  const response = await page.request.post(`${base}/jobs/${name}`, {
    data: body,
    headers: { Authorization: `Bearer ${token}` },
  });
  check(response.status() === 202, `POST /jobs/${name} answered ${response.status()}: ${await response.text()}`);
  const { id } = await response.json();
  return { id, row: rowOf(page, id) };
}

// Another client at the page's address opens event streams until the server
// refuses one (MAX_EVENT_STREAMS_PER_CLIENT): the page's next stream meets a
// 429 too. What it answers is the way to let them go.
async function takeEveryStream(taskId) {
  const held = [];
  const release = () => held.forEach((controller) => controller.abort());
  for (let i = 0; i < 8; i += 1) {
    const controller = new AbortController();
    const response = await fetch(`${base}/tasks/${taskId}/events`, {
      headers: { Authorization: `Bearer ${token}` },
      signal: controller.signal,
    });
    if (response.status === 429) {
      await response.body?.cancel();
      return release;
    }
    held.push(controller);
    if (response.status !== 200) {
      release();
      throw new Error(`a stream of another client answered ${response.status}`);
    }
  }
  release();
  throw new Error("eight streams of one client open and no 429: the per-client bound is missing");
}

async function waitForStatus(row, status, options = {}) {
  await row.getByRole("cell", { name: status, exact: true }).waitFor(options);
}

async function progress(row) {
  return row.getByRole("progressbar").evaluate((bar) => ({ value: bar.value, max: bar.max }));
}

// The bar moves while the person watches, with no reload.
async function waitForProgress(page, row, atLeast) {
  const bar = await row.getByRole("progressbar").elementHandle();
  await page.waitForFunction(([bar, least]) => bar.value >= least, [bar, atLeast]);
}

// The rows' task ids, top to bottom.
async function listed(page) {
  const rows = page.getByRole("row").filter({ has: page.getByRole("progressbar") });
  return rows.evaluateAll((trs) => trs.map((tr) => tr.cells[0].title));
}

// A first visit, a reload or a visit after a restart: the page has no token,
// lists nothing, says why and asks for the token.
async function asksForToken(page) {
  await page.getByRole("status").getByText(REFUSED).waitFor();
  check((await listed(page)).length === 0, "without the token the page lists tasks");
  const field = page.getByLabel("API token");
  check((await field.getAttribute("aria-invalid")) === "true", "the token field is not marked as wanted");
  check(await field.evaluate((input) => input === document.activeElement), "the token field has no focus");
}

// Enter in the token field loads the list; it starts no countdown.
async function enterToken(page) {
  await page.getByLabel("API token").fill(token);
  await page.getByLabel("API token").press("Enter");
  await page.waitForFunction(() => !document.querySelector("#token").hasAttribute("aria-invalid"));
}

// Every event stream the page opened, as "status id".
function watchStreams(page) {
  const answers = [];
  page.on("response", (response) => {
    const path = new URL(response.url()).pathname.split("/");
    if (path[1] === "tasks" && path[3] === "events") answers.push(`${response.status()} ${path[2]}`);
  });
  return answers;
}

async function firstPart(page) {
  const streamed = watchStreams(page);
  await page.goto(base);

  step("without the token the list shows the server's 401 detail and asks for the token");
  await asksForToken(page);

  step("Start without the token shows the server's 401 detail");
  await page.getByRole("button", { name: "Start" }).click();
  const alert = page.getByRole("alert");
  await alert.getByText(REFUSED).waitFor();

  step("with the token, the list loads, and a 3-second countdown runs to succeeded with a full bar");
  await enterToken(page);
  await page.getByRole("status").getByText("No tasks yet.").waitFor();
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
  check(streamed.includes(`200 ${long.id}`), `the page streamed no events of ${long.id}: ${streamed}`);

  step("after a reload the page asks for the token again, then lists the tasks newest first and follows the running one");
  const running = await start(page, 20);
  await page.reload();
  await asksForToken(page);
  await enterToken(page);
  await running.row.waitFor();
  const expected = [running.id, long.id, short.id];
  const rows = await listed(page);
  check(JSON.stringify(rows) === JSON.stringify(expected), `rows ${rows}; expected ${expected}`);
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
  const crowd = [];
  for (let i = 0; i < 6; i += 1) crowd.push(await start(page, 2));
  for (const task of crowd) await waitForStatus(task.row, "succeeded");

  step("when the server refuses a stream (429), the page polls the task to its end");
  // Long enough to be still running once the restarted stack is ready and
  // the second part's browser is up, on a busy machine too: the restarted
  // worker runs it again from its start.
  const survivor = await start(page, SURVIVOR_SECONDS);
  await waitForProgress(page, survivor.row, 1);
  const release = await takeEveryStream(survivor.id);
  let polled;
  try {
    polled = await start(page, 2);
    await waitForStatus(polled.row, "succeeded");
  } finally {
    release();
  }
  check(streamed.includes(`429 ${polled.id}`), `no stream of ${polled.id} met a 429: ${streamed}`);
  const polledBar = await progress(polled.row);
  check(polledBar.value === 2 && polledBar.max === 2, `the polled task's bar is at ${polledBar.value} of ${polledBar.max}`);

  step("one countdown is still running when the first part ends");
  await waitForStatus(survivor.row, "running");
  const order = [short, long, running, tally, failing, ...crowd, survivor, polled].map((task) => task.id);
  return {
    succeeded: short.id,
    cancelled: long.id,
    running: running.id,
    tally: tally.id,
    failing: failing.id,
    survivor: survivor.id,
    order,
  };
}

async function afterRestart(page, ids) {
  const streamed = watchStreams(page);
  await page.goto(base);

  step("after the restart, without the token the list shows the server's 401 detail and no task");
  await asksForToken(page);
  await enterToken(page);

  step("with the token, the page lists every task posted before the restart, newest first, as it ended");
  const survivor = rowOf(page, ids.survivor);
  await survivor.waitFor();
  const expected = [...ids.order].reverse();
  const rows = await listed(page);
  check(JSON.stringify(rows) === JSON.stringify(expected), `rows ${rows}; expected ${expected}`);
  await waitForStatus(rowOf(page, ids.succeeded), "succeeded");
  await waitForStatus(rowOf(page, ids.cancelled), "cancelled");
  await rowOf(page, ids.tally).getByText('{"title":"fruit","counts":{"apple":2,"pear":1}}', { exact: true }).waitFor();
  await rowOf(page, ids.failing).getByText("ValueError: oops: cannot count 'fail' (attempt 2)").waitFor();

  step("the countdown that was running when the stack stopped is streamed, moves live and ends");
  const first = await survivor.getByRole("cell", { name: /^(queued|handed_back|running|succeeded)$/ }).textContent();
  check(first !== "succeeded", `${ids.survivor} had ended before the page saw it: the stack took too long to start`);
  const bar = await survivor.getByRole("progressbar").elementHandle();
  const seen = await bar.evaluate((progress) => progress.value);
  await page.waitForFunction(([progress, seen]) => progress.value !== seen, [bar, seen]);
  await waitForStatus(survivor, "running");
  await waitForStatus(survivor, "succeeded", { timeout: (SURVIVOR_SECONDS + 15) * 1000 });
  const end = await progress(survivor);
  const full = end.max === SURVIVOR_SECONDS && end.value === SURVIVOR_SECONDS;
  check(full, `the survivor's bar is at ${end.value} of ${end.max}`);
  check(streamed.includes(`200 ${ids.survivor}`), `the page streamed no events of ${ids.survivor}: ${streamed}`);

  step("a countdown started an hour later shows scheduled with its due time, and Cancel ends it");
  await page.getByLabel("Start in (s)").fill("3600");
  const later = await start(page, 3);
  await page.getByLabel("Start in (s)").fill("");
  await waitForStatus(later.row, "scheduled");
  await later.row.getByText(/^due \d/).waitFor();
  await later.row.getByRole("button", { name: "Cancel" }).click();
  await waitForStatus(later.row, "cancelled");
  check((await later.row.locator(".due").textContent()) === "", "a cancelled task still shows a due time");
  await page.screenshot({ path: screenshot, fullPage: true });
  return { survivor: ids.survivor };
}

async function visit(page) {
  const problems = [];
  page.on("pageerror", (error) => problems.push(`uncaught: ${error.message}`));
  page.on("console", (message) => {
    // Chromium logs the 401s and the 429 that the visit meets on purpose.
    if (message.type() === "error" && !/status of (401|429)/.test(message.text())) {
      problems.push(`console: ${message.text()}`);
    }
  });
  const result = before ? await afterRestart(page, JSON.parse(before)) : await firstPart(page);
  check(problems.length === 0, `the page reported errors:\n${problems.join("\n")}`);
  return result;
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
