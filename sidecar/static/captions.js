// The live-captions page: a client secret from ./token, then one of two transports (docs/browser.md):
// - WebSocket (the default): the microphone through an AudioWorklet (24 kHz PCM16), streamed to the sidecar's
//   /v1/realtime as input_audio_buffer.append events, committed every 2 s of audio (the session has no server
//   VAD). The usage row counts the bytes actually handed to the WebSocket: the sidecar bills those same bytes.
// - WebRTC (`?transport=webrtc`): a call created through the sidecar's POST /v1/realtime/calls (the SDP offer,
//   authenticated by the secret); the microphone goes to the provider as an audio track and its events come
//   back on the `oai-events` data channel. The usage row adds up the seconds the provider reports in each
//   transcript's usage: the sidecar bills the call from those same reports.
// Either way the transcription deltas and completed lines are shown as they arrive.

const BYTES_PER_SECOND = 48000; // audio/pcm at 24 kHz, 16-bit mono (docs/api.md, "Metering and billing")
const CHUNK_SAMPLES = 2400; // 100 ms per append
const COMMIT_BYTES = 2 * BYTES_PER_SECOND; // commit every 2 s of audio
const MIN_COMMIT_BYTES = BYTES_PER_SECOND / 10; // providers refuse commits of less than 100 ms
const DRAIN_MS = 5000; // after Stop, how long to wait for the last transcript before closing
const ICE_GATHER_MS = 3000; // the offer is sent with the candidates gathered by then (no trickle ICE)
const HANGUP_MARGIN_S = 10; // hang up with a fresh secret when the call's is this close to expiring
const HANGUP_WAIT_MS = 3000; // after the hangup, how long to wait for the provider to close the call
const TRANSPORT = new URLSearchParams(window.location.search).get('transport') === 'webrtc' ? 'webrtc' : 'websocket';
const CLOSE_REASONS = {
  4001: 'the key was revoked',
  4002: 'the budget is exhausted',
  4003: 'an administrator ended the session',
  4008: 'the session timed out',
  1001: 'the server is restarting',
  1011: 'the transcription service failed',
};

const el = (id) => document.getElementById(id);
const ui = {
  start: el('start'),
  stop: el('stop'),
  status: el('status'),
  captions: el('captions'),
  partial: el('partial'),
  row: el('billing-row'),
  model: el('usage-model'),
  seconds: el('usage-seconds'),
  cost: el('usage-cost'),
  note: el('usage-note'),
};

if (TRANSPORT === 'webrtc') {
  ui.note.textContent =
    'Over WebRTC the seconds are those the transcription service reports hearing in each caption, ' +
    "which the sidecar bills; the cost applies the model's listed price.";
}

let current = null; // the live CaptionSession, if any

function setStatus(text) {
  ui.status.textContent = text;
}

function setState(state) {
  // A disabled button drops focus to <body>: keep keyboard focus on the control that can act next,
  // unless the user has moved it elsewhere (e.g. into the captions).
  const active = document.activeElement;
  const onControls = active === ui.start || active === ui.stop || active === document.body || active === null;
  const idle = state === 'idle' || state === 'stopped';
  document.body.dataset.state = state;
  ui.start.disabled = !idle;
  ui.stop.disabled = state !== 'live';
  if (onControls && state === 'live') ui.stop.focus();
  if (onControls && idle) ui.start.focus();
}

function toBase64(buffer) {
  const bytes = new Uint8Array(buffer);
  let text = '';
  for (let i = 0; i < bytes.length; i += 0x8000) {
    text += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  }
  return btoa(text);
}

function pricePerSecond(model) {
  const pricing = (model && model.pricing) || {};
  if (model && model.unit === 'second' && pricing.input_cost_per_second !== undefined) {
    return Number(pricing.input_cost_per_second);
  }
  if (model && model.unit === 'minute' && pricing.input_cost_per_minute !== undefined) {
    return Number(pricing.input_cost_per_minute) / 60;
  }
  return null; // token-priced models: the cost is not a function of the audio alone
}

async function fetchToken() {
  const response = await fetch('token', {
    method: 'POST',
    headers: { 'Content-Type': 'application/json' },
    body: '{}',
    credentials: 'same-origin',
  });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    const message = (body.error && body.error.message) || `HTTP ${response.status}`;
    throw new Error(`No captions token: ${message}`);
  }
  return body;
}

function realtimeUrl(model) {
  const url = new URL('../v1/realtime', window.location.href);
  url.protocol = url.protocol === 'https:' ? 'wss:' : 'ws:';
  url.searchParams.set('model', model);
  url.searchParams.set('intent', 'transcription');
  return url.href;
}

class CaptionSession {
  constructor(token) {
    this.token = token;
    this.model = token.session.audio.input.transcription.model;
    this.price = pricePerSecond(token.model);
    this.bytesSent = 0;
    this.uncommitted = 0;
    this.pending = 0; // commits not yet answered by a completed transcript (or an error)
    this.partials = new Map(); // item_id -> text heard so far
    this.capturing = false;
    this.closedByUs = false;
    this.onDrained = null;
  }

  async open() {
    this.stream = await navigator.mediaDevices.getUserMedia({
      audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true, autoGainControl: true },
    });
    try {
      this.context = new AudioContext({ sampleRate: 24000, latencyHint: 'interactive' });
    } catch {
      this.context = new AudioContext({ latencyHint: 'interactive' }); // the worklet resamples
    }
    await this.context.audioWorklet.addModule('captions-worklet.js');
    await this.connect();
    const source = this.context.createMediaStreamSource(this.stream);
    this.node = new AudioWorkletNode(this.context, 'pcm16-capture', {
      processorOptions: { targetRate: 24000, chunkSamples: CHUNK_SAMPLES },
    });
    this.node.port.onmessage = (message) => this.send(message.data);
    // A muted path to the destination keeps the graph pulling the worklet in every browser.
    const mute = new GainNode(this.context, { gain: 0 });
    source.connect(this.node).connect(mute).connect(this.context.destination);
    this.capturing = true;
    await this.context.resume();
  }

  connect() {
    return new Promise((resolve, reject) => {
      const protocols = ['realtime', `openai-insecure-api-key.${this.token.value}`];
      this.ws = new WebSocket(realtimeUrl(this.model), protocols);
      this.ws.onopen = () => resolve();
      this.ws.onmessage = (message) => this.receive(message.data);
      this.ws.onclose = (close) => {
        reject(new Error('The captions service refused the connection.'));
        this.closed(close);
      };
    });
  }

  seconds() {
    return this.bytesSent / BYTES_PER_SECOND;
  }

  send(buffer) {
    if (!this.capturing || this.ws.readyState !== WebSocket.OPEN) return;
    this.ws.send(JSON.stringify({ type: 'input_audio_buffer.append', audio: toBase64(buffer) }));
    this.bytesSent += buffer.byteLength;
    this.uncommitted += buffer.byteLength;
    if (this.uncommitted >= COMMIT_BYTES) this.commit();
    renderUsage(this);
  }

  commit() {
    this.ws.send(JSON.stringify({ type: 'input_audio_buffer.commit' }));
    this.uncommitted = 0;
    this.pending += 1;
  }

  receive(data) {
    const event = parseEvent(data);
    if (event !== null) showTranscription(this, event);
  }

  answered() {
    this.pending = Math.max(0, this.pending - 1);
    if (this.pending === 0 && this.onDrained) this.onDrained();
  }

  stopCapture() {
    this.capturing = false;
    if (this.node) this.node.port.onmessage = null;
    if (this.stream) this.stream.getTracks().forEach((track) => track.stop());
    if (this.context && this.context.state !== 'closed') this.context.close();
  }

  async stop() {
    this.stopCapture();
    if (this.ws.readyState !== WebSocket.OPEN) return;
    if (this.uncommitted >= MIN_COMMIT_BYTES) this.commit();
    if (this.pending > 0) {
      await new Promise((resolve) => {
        this.onDrained = resolve;
        setTimeout(resolve, DRAIN_MS);
      });
    }
    this.closedByUs = true;
    this.ws.close(1000, 'done');
  }

  closed(close) {
    this.stopCapture();
    if (!this.closedByUs && close.code !== 1000) {
      const why = CLOSE_REASONS[close.code] || close.reason || `code ${close.code}`;
      setStatus(`Captions stopped: ${why}.`);
    } else {
      setStatus('Stopped.');
    }
    if (current === this) current = null;
    setState('stopped');
  }
}

function renderUsage(session) {
  const seconds = session.seconds();
  ui.row.dataset.bytesSent = String(session.bytesSent);
  ui.row.dataset.audioSeconds = String(seconds);
  ui.seconds.textContent = `${seconds.toFixed(1)} s`;
  if (session.price !== null) {
    const cost = seconds * session.price;
    ui.row.dataset.costUsd = String(cost);
    ui.cost.textContent = `$${cost.toFixed(6)}`;
  }
}

function renderPartials(session) {
  ui.partial.textContent = Array.from(session.partials.values()).join(' ');
}

function addCaption(text) {
  if (!text || !text.trim()) return;
  const line = document.createElement('p');
  line.textContent = text.trim();
  ui.captions.append(line);
  ui.captions.scrollTop = ui.captions.scrollHeight;
}

function callsUrl(path) {
  return new URL(`../v1/realtime/calls${path}`, window.location.href).href;
}

function waitForIceGathering(pc) {
  return new Promise((resolve) => {
    if (pc.iceGatheringState === 'complete') return resolve();
    const done = () => {
      if (pc.iceGatheringState !== 'complete') return;
      pc.removeEventListener('icegatheringstatechange', done);
      resolve();
    };
    pc.addEventListener('icegatheringstatechange', done);
    setTimeout(resolve, ICE_GATHER_MS);
  });
}

// A WebRTC call through the sidecar: the provider hears the microphone track and answers on `oai-events`.
class CallSession {
  constructor(token) {
    this.token = token;
    this.model = token.session.audio.input.transcription.model;
    this.price = pricePerSecond(token.model);
    this.bytesSent = 0; // no audio goes through the page's own code on this transport
    this.microseconds = 0; // the seconds the provider reported, summed exactly (in whole microseconds)
    this.pending = 0;
    this.partials = new Map();
    this.capturing = false;
    this.closedByUs = false;
    this.onDrained = null;
    this.callId = null;
    this.live = false; // from the data channel's opening to the end of the call
    this.failOpen = null;
  }

  seconds() {
    return this.microseconds / 1e6;
  }

  async open() {
    this.stream = await navigator.mediaDevices.getUserMedia({
      audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true, autoGainControl: true },
    });
    this.pc = new RTCPeerConnection();
    this.pc.addEventListener('connectionstatechange', () => {
      if (this.pc.connectionState === 'failed') this.ended('the connection failed');
    });
    for (const track of this.stream.getAudioTracks()) this.pc.addTrack(track, this.stream);
    this.channel = this.pc.createDataChannel('oai-events');
    this.channel.onmessage = (message) => this.receive(message.data);
    this.channel.onclose = () => this.ended('the call ended');
    const opened = new Promise((resolve, reject) => {
      this.channel.onopen = () => resolve();
      this.failOpen = reject;
    });
    await this.pc.setLocalDescription(await this.pc.createOffer());
    await waitForIceGathering(this.pc);
    const form = new FormData();
    form.set('sdp', this.pc.localDescription.sdp);
    form.set('session', JSON.stringify({ type: 'transcription' }));
    const response = await fetch(callsUrl(''), {
      method: 'POST',
      headers: { Authorization: `Bearer ${this.token.value}` },
      body: form,
    });
    const answer = await response.text();
    if (!response.ok) {
      let message = `HTTP ${response.status}`;
      try {
        message = JSON.parse(answer).error.message || message;
      } catch {
        // not an OpenAI error body: keep the status
      }
      throw new Error(`The captions service refused the call: ${message}`);
    }
    const location = response.headers.get('Location') || '';
    this.callId = decodeURIComponent(location.split('/').filter(Boolean).pop() || '');
    ui.row.dataset.callId = this.callId;
    await this.pc.setRemoteDescription({ type: 'answer', sdp: answer });
    await opened;
    this.failOpen = null;
    this.live = true;
    this.capturing = true;
  }

  receive(data) {
    const event = parseEvent(data);
    if (event === null) return;
    if (event.type === 'conversation.item.input_audio_transcription.completed') {
      const usage = event.usage || {};
      if (usage.type === 'duration' && Number.isFinite(usage.seconds)) {
        this.microseconds += Math.round(usage.seconds * 1e6);
        renderUsage(this);
      }
    }
    showTranscription(this, event);
  }

  answered() {
    this.pending = Math.max(0, this.pending - 1);
    if (this.pending === 0 && this.onDrained) this.onDrained();
  }

  stopCapture() {
    this.capturing = false;
    if (this.stream) this.stream.getTracks().forEach((track) => track.stop());
  }

  async stop() {
    // The microphone stops first; the commit then asks for the transcript of what the provider heard.
    this.stopCapture();
    if (this.channel.readyState === 'open') {
      this.channel.send(JSON.stringify({ type: 'input_audio_buffer.commit' }));
      this.pending += 1;
      await new Promise((resolve) => {
        this.onDrained = resolve;
        setTimeout(resolve, DRAIN_MS);
      });
    }
    this.closedByUs = true;
    if (await this.hangup()) {
      // The provider ends the call (its data channel closes) before this side closes: the call ends as hung up.
      await new Promise((resolve) => {
        if (this.channel.readyState === 'closed') return resolve();
        this.channel.onclose = resolve;
        setTimeout(resolve, HANGUP_WAIT_MS);
      });
    }
    this.ended();
  }

  async hangup() {
    // The call's secret authenticates its hangup while it lives; past that, a fresh one of the same key.
    let secret = this.token.value;
    if (Date.now() / 1000 > this.token.expires_at - HANGUP_MARGIN_S) {
      secret = (await fetchToken().catch(() => this.token)).value;
    }
    if (!this.callId) return false;
    const response = await fetch(callsUrl(`/${encodeURIComponent(this.callId)}/hangup`), {
      method: 'POST',
      headers: { Authorization: `Bearer ${secret}` },
    }).catch(() => null); // closing the connection ends the call too
    return response !== null && response.ok && this.channel.readyState === 'open';
  }

  close() {
    if (this.channel) {
      this.channel.onclose = null;
      this.channel.close();
    }
    if (this.pc) this.pc.close();
  }

  ended(why) {
    if (!this.live) {
      // Still opening: open() fails, and start() reports it.
      if (this.failOpen) this.failOpen(new Error(`The call could not start: ${why}.`));
      return;
    }
    this.live = false;
    this.stopCapture();
    this.close();
    setStatus(this.closedByUs ? 'Stopped.' : `Captions stopped: ${why}.`);
    if (current === this) current = null;
    setState('stopped');
  }
}

function parseEvent(data) {
  try {
    const event = JSON.parse(data);
    return event && typeof event === 'object' ? event : null;
  } catch {
    return null;
  }
}

// The transcription events of either transport: deltas in the in-progress line, completed lines as captions.
function showTranscription(session, event) {
  if (event.type === 'conversation.item.input_audio_transcription.delta') {
    session.partials.set(event.item_id, (session.partials.get(event.item_id) || '') + event.delta);
    renderPartials(session);
  } else if (event.type === 'conversation.item.input_audio_transcription.completed') {
    session.partials.delete(event.item_id);
    renderPartials(session);
    addCaption(event.transcript);
    session.answered();
  } else if (event.type === 'error') {
    const error = event.error || {};
    if (error.code === 'input_audio_buffer_commit_empty') session.answered();
    else setStatus(`Error: ${error.message || error.code || 'unknown'}`);
  }
}

async function start() {
  setState('starting');
  setStatus('Connecting…');
  try {
    const token = await fetchToken();
    const session = TRANSPORT === 'webrtc' ? new CallSession(token) : new CaptionSession(token);
    current = session;
    ui.model.textContent = token.model ? token.model.id : session.model;
    ui.row.dataset.transport = TRANSPORT;
    renderUsage(session);
    await session.open();
    setState('live');
    setStatus('Listening. Captions appear every couple of seconds.');
  } catch (error) {
    if (current) current.stopCapture();
    if (current && current.close) current.close();
    current = null;
    setState('idle');
    setStatus(error.name === 'NotAllowedError' ? 'Microphone access was denied.' : error.message);
  }
}

async function stop() {
  if (!current) return;
  setState('stopping');
  setStatus('Finishing the last caption…');
  await current.stop();
}

// Leaving the page closes a WebRTC call's connection at once (the provider then ends the call) rather than
// leaving the provider to notice the silence of a vanished peer (ICE consent: about 30 s).
window.addEventListener('pagehide', () => {
  if (current && current.close) current.close();
});

ui.start.addEventListener('click', start);
ui.stop.addEventListener('click', stop);
