// Drives the live-captions page in Debian's headless Chromium (never a downloaded browser) with a fake
// microphone that plays a WAV file in a loop, through playwright-core installed under tools/ by
// scripts/ensure-playwright.sh. tests/test_browser.py runs it against a live sidecar.
//
//   node tests/browser/captions.mjs <page url> <wav file> <screenshot.png> [min captions] [stop|close|refused|ended]
//
// Uses only the keyboard to start and stop (Tab to "Start captions", Enter; focus then sits on "Stop").
// With `close` it closes the tab instead of pressing Stop (the user walks away mid-session) and reports what
// the page showed just before; with `refused` it expects Start to fail (the page back to idle, no captions);
// with `ended` it waits for the server to end the session (an administrator, a revoked key, ...).
// The page's WebRTC mode (`<page url>?transport=webrtc`) needs nothing more than the flag below that shows
// the machine's real host ICE candidates instead of mDNS `.local` names (tests/test_browser_webrtc.py).
// Prints one JSON line on stdout with what the page showed; exits non-zero on any failure.
import { createRequire } from 'node:module';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

const require = createRequire(new URL('../../tools/node_modules/', import.meta.url));
const { chromium } = require('playwright-core');

const [pageUrl, wav, screenshot, minCaptionsArg, ending] = process.argv.slice(2);
const minCaptions = Number(minCaptionsArg || 2);
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const DEADLINE_MS = 60_000;

const profile = mkdtempSync(join(tmpdir(), 'captions-chromium-'));
const context = await chromium.launchPersistentContext(profile, {
  executablePath: CHROMIUM,
  headless: true,
  viewport: { width: 900, height: 760 },
  args: [
    '--no-sandbox',
    '--disable-gpu',
    '--disable-quic',
    '--no-first-run',
    '--disable-background-networking',
    '--disable-component-update',
    '--disable-sync',
    '--use-fake-device-for-media-stream',
    '--use-fake-ui-for-media-stream',
    `--use-file-for-fake-audio-capture=${wav}`,
    // WebRTC on one machine: offer the host's own address, not an mDNS name (no reliance on multicast DNS).
    '--disable-features=WebRtcHideLocalIpsWithMdns',
  ],
});
try {
  const page = context.pages()[0] || (await context.newPage());
  page.on('console', (message) => process.stderr.write(`[console.${message.type()}] ${message.text()}\n`));
  page.on('pageerror', (error) => process.stderr.write(`[pageerror] ${error.message}\n`));
  await page.goto(pageUrl);

  // Record every text the in-progress (delta) line shows, to prove deltas are rendered as they arrive.
  await page.evaluate(() => {
    window.__partials = [];
    const partial = document.getElementById('partial');
    new MutationObserver(() => {
      if (partial.textContent) window.__partials.push(partial.textContent);
    }).observe(partial, { childList: true, characterData: true, subtree: true });
  });

  await page.keyboard.press('Tab');
  const firstFocus = await page.evaluate(() => document.activeElement.id);
  await page.keyboard.press('Enter');
  let focusWhileLive = null;
  if (ending === 'refused') {
    await page.waitForFunction(
      () => document.body.dataset.state === 'idle' && !['Ready.', 'Connecting…'].includes(
        document.getElementById('status').textContent,
      ),
      null,
      { timeout: DEADLINE_MS },
    );
  } else {
    await page.waitForSelector('body[data-state="live"]', { timeout: DEADLINE_MS });
    await page.waitForFunction(
      (n) => document.querySelectorAll('#captions p').length >= n,
      minCaptions,
      { timeout: DEADLINE_MS },
    );
    focusWhileLive = await page.evaluate(() => document.activeElement.id);
  }
  if (ending === 'stop' || ending === undefined) {
    await page.keyboard.press('Enter'); // Stop
    await page.waitForSelector('body[data-state="stopped"]', { timeout: DEADLINE_MS });
  } else if (ending === 'ended') {
    await page.waitForSelector('body[data-state="stopped"]', { timeout: DEADLINE_MS }); // ended by the server
  }
  await page.screenshot({ path: screenshot, fullPage: true });

  const result = await page.evaluate(() => {
    const row = document.getElementById('billing-row');
    const captions = document.getElementById('captions');
    const name = (id) => document.getElementById(id).textContent.trim();
    return {
      bytesSent: row.dataset.bytesSent,
      audioSeconds: row.dataset.audioSeconds,
      transport: row.dataset.transport,
      callId: row.dataset.callId || null,
      costUsd: row.dataset.costUsd,
      secondsText: name('usage-seconds'),
      costText: name('usage-cost'),
      model: name('usage-model'),
      captions: Array.from(captions.querySelectorAll('p'), (p) => p.textContent),
      partials: window.__partials,
      status: name('status'),
      captionsRole: captions.getAttribute('role'),
      captionsLive: captions.getAttribute('aria-live'),
      statusRole: document.getElementById('status').getAttribute('role'),
      buttons: Array.from(document.querySelectorAll('button'), (b) => b.textContent.trim()),
    };
  });
  if (ending === 'close') await page.close();
  process.stdout.write(`${JSON.stringify({ ...result, firstFocus, focusWhileLive })}\n`);
} finally {
  await context.close();
  rmSync(profile, { recursive: true, force: true });
}
