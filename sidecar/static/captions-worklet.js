// AudioWorklet processor: the microphone (first channel) -> 24 kHz 16-bit little-endian PCM, posted to the
// page in chunks of `chunkSamples` samples (100 ms by default) as transferred ArrayBuffers.
// The context usually runs at 24 kHz already (the page asks for it); otherwise this resamples linearly
// from the context's `sampleRate` (a global of the worklet scope).

class Pcm16Capture extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const opts = (options && options.processorOptions) || {};
    this.chunkSamples = opts.chunkSamples || 2400;
    this.step = sampleRate / (opts.targetRate || 24000); // input samples per output sample
    this.position = 0; // where the next output sample lies, in input samples from this block's start (>= -1)
    this.previous = 0; // the last input sample of the previous block (index -1)
    this.chunk = new Int16Array(this.chunkSamples);
    this.filled = 0;
  }

  process(inputs) {
    const channel = inputs[0] && inputs[0][0];
    if (!channel || channel.length === 0) {
      return true;
    }
    const last = channel.length - 1;
    let t = this.position;
    while (t <= last) {
      const i = Math.floor(t);
      const a = i < 0 ? this.previous : channel[i];
      const frac = t - i;
      const value = frac === 0 ? a : a + (channel[i + 1] - a) * frac;
      this.push(value);
      t += this.step;
    }
    this.position = t - channel.length;
    this.previous = channel[last];
    return true;
  }

  push(value) {
    const s = Math.max(-1, Math.min(1, value));
    this.chunk[this.filled++] = Math.round(s < 0 ? s * 0x8000 : s * 0x7fff);
    if (this.filled === this.chunkSamples) {
      this.port.postMessage(this.chunk.buffer, [this.chunk.buffer]);
      this.chunk = new Int16Array(this.chunkSamples);
      this.filled = 0;
    }
  }
}

registerProcessor('pcm16-capture', Pcm16Capture);
