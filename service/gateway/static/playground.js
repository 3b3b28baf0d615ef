// k5serve playground: a small page over the public /v1 API. Plain JavaScript, no build step, no dependencies.
//
// Every request carries the API key the user typed as a bearer token. That is why progress is read from the
// event stream with fetch() rather than EventSource (which cannot send headers), and why the video and the
// thumbnails are fetched as blobs rather than linked: the gateway's content route needs the key, while the
// presigned object-store URL it redirects to does not (the browser drops the header on that redirect).
"use strict";

(() => {
  const KEY_STORAGE = "k5serve.apiKey";
  const MODEL_STORAGE = "k5serve.model";
  const TERMINAL = new Set(["completed", "failed"]);
  const RECENT_LIMIT = 12;
  // The page lives at <gateway>/playground/, so "../" is the gateway root, prefix and all.
  const API_ROOT = new URL("../", window.location.href);

  const $ = (id) => document.getElementById(id);
  const el = {
    key: $("api-key"),
    keyToggle: $("key-toggle"),
    form: $("create-form"),
    prompt: $("prompt"),
    model: $("model"),
    size: $("size"),
    seconds: $("seconds"),
    modelNote: $("model-note"),
    imageField: $("image-field"),
    image: $("image"),
    imagePreview: $("image-preview"),
    negativePrompt: $("negative-prompt"),
    seed: $("seed"),
    steps: $("steps"),
    guidance: $("guidance"),
    formError: $("form-error"),
    generate: $("generate"),
    jobEmpty: $("job-empty"),
    job: $("job"),
    jobStatus: $("job-status"),
    jobId: $("job-id"),
    jobPrompt: $("job-prompt"),
    jobProgress: $("job-progress"),
    jobProgressText: $("job-progress-text"),
    jobLive: $("job-live"),
    jobError: $("job-error"),
    jobDetails: $("job-details"),
    playerBox: $("player-box"),
    player: $("player"),
    cancel: $("cancel"),
    download: $("download"),
    del: $("delete"),
    refresh: $("refresh"),
    recent: $("recent"),
    recentEmpty: $("recent-empty"),
  };

  const state = {
    models: [],
    current: null, // the video object shown in the result panel
    follow: null, // AbortController of the stream or poll loop following `current`
    rate: null, // {t, p}: where progress stood when we first saw it move, for a local ETA
    announced: "", // last text given to the aria-live region
    playerUrl: null,
    thumbs: new Map(), // video id -> blob: URL of its thumbnail
  };

  // -- API -----------------------------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, message, param, code) {
      super(message);
      this.status = status;
      this.param = param;
      this.code = code;
    }
  }

  function apiUrl(path) {
    return new URL(path.replace(/^\//, ""), API_ROOT);
  }

  function authHeaders(extra = {}) {
    const key = el.key.value.trim();
    return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
  }

  async function errorFrom(resp) {
    let body = null;
    try {
      body = await resp.json();
    } catch (_) {
      // not JSON: fall through to the status line
    }
    const e = body && body.error;
    if (e && e.message) return new ApiError(resp.status, e.message, e.param || null, e.code || null);
    if (resp.status === 401) return new ApiError(401, "The server refused the API key.", null, null);
    return new ApiError(resp.status, `HTTP ${resp.status} ${resp.statusText}`.trim(), null, null);
  }

  async function request(path, options = {}) {
    let resp;
    try {
      resp = await fetch(apiUrl(path), { ...options, headers: authHeaders(options.headers) });
    } catch (err) {
      if (err.name === "AbortError") throw err;
      throw new ApiError(0, "Cannot reach the server.", null, "network");
    }
    if (!resp.ok) throw await errorFrom(resp);
    return resp;
  }

  // Seeds go up to 2^63 - 1, past what a JavaScript number holds exactly: read them as strings, so the seed shown
  // is the one that reproduces the video. (Inside a JSON string a quote is escaped, so this cannot touch a prompt.)
  const parseJson = (text) => JSON.parse(text.replace(/("seed"\s*:\s*)(\d+)/g, '$1"$2"'));

  const getJson = async (path, options) => parseJson(await (await request(path, options)).text());

  async function fetchBlobUrl(videoId, variant) {
    const resp = await request(`/v1/videos/${encodeURIComponent(videoId)}/content?variant=${variant}`);
    return URL.createObjectURL(await resp.blob());
  }

  // -- small helpers -------------------------------------------------------------------------------------

  function option(value, label, { disabled = false, selected = false } = {}) {
    const o = document.createElement("option");
    o.value = value;
    o.textContent = label;
    o.disabled = disabled;
    o.selected = selected;
    return o;
  }

  function showError(target, err) {
    if (err && err.name === "AbortError") return;
    let text = err instanceof ApiError ? err.message : String(err && err.message ? err.message : err);
    if (err instanceof ApiError && err.param) text += ` (${err.param})`;
    target.textContent = text;
    target.hidden = false;
  }

  function clearError(target) {
    target.textContent = "";
    target.hidden = true;
  }

  function formatDuration(seconds) {
    const s = Math.max(0, Math.round(seconds));
    return `${Math.floor(s / 60)}:${String(s % 60).padStart(2, "0")}`;
  }

  const sleep = (ms, signal) =>
    new Promise((resolve, reject) => {
      const timer = setTimeout(resolve, ms);
      signal.addEventListener(
        "abort",
        () => {
          clearTimeout(timer);
          reject(new DOMException("aborted", "AbortError"));
        },
        { once: true },
      );
    });

  // -- models and the form -------------------------------------------------------------------------------

  function selectedModel() {
    return state.models.find((m) => m.id === el.model.value) || null;
  }

  async function loadModels() {
    clearError(el.formError);
    try {
      state.models = (await getJson("/v1/models")).data;
    } catch (err) {
      state.models = [];
      showError(el.formError, err);
    }
    const remembered = localStorage.getItem(MODEL_STORAGE);
    const online = state.models.filter((m) => m.online);
    // A text-to-video model is the easier start: it needs nothing but a prompt.
    const pick =
      online.find((m) => m.id === remembered) || online.find((m) => m.task === "text-to-video") || online[0];
    el.model.replaceChildren(
      // Offline models stay visible, so people see what exists, but cannot be chosen.
      ...state.models.map((m) =>
        option(m.id, m.online ? m.id : `${m.id} (offline)`, { disabled: !m.online, selected: m === pick }),
      ),
    );
    onModelChange();
  }

  function onModelChange() {
    const m = selectedModel();
    const usable = Boolean(m && m.online);
    el.generate.disabled = !usable;
    if (!m) {
      el.size.replaceChildren();
      el.seconds.replaceChildren();
      el.imageField.hidden = true;
      el.modelNote.textContent = state.models.length ? "No model is online right now." : "";
      return;
    }
    localStorage.setItem(MODEL_STORAGE, m.id);
    // Keep the size and duration already chosen when the new model has them too; else the model's defaults.
    const size = m.sizes.includes(el.size.value) ? el.size.value : m.default_size;
    const seconds = m.seconds.includes(el.seconds.value) ? el.seconds.value : m.default_seconds;
    el.size.replaceChildren(...m.sizes.map((s) => option(s, s.replace("x", " × "), { selected: s === size })));
    el.seconds.replaceChildren(...m.seconds.map((s) => option(s, `${s} s`, { selected: s === seconds })));
    const i2v = m.task === "image-to-video";
    el.imageField.hidden = !i2v;
    el.image.required = i2v;
    el.steps.placeholder = String(m.default_num_inference_steps);
    el.steps.max = String(m.max_num_inference_steps);
    el.guidance.placeholder = String(m.default_guidance_scale);
    el.modelNote.textContent = `${m.task === "image-to-video" ? "Image to video" : "Text to video"}, ${
      m.default_num_inference_steps
    } steps by default. ${m.description || ""}`.trim();
  }

  function onImageChange() {
    const file = el.image.files && el.image.files[0];
    if (el.imagePreview.src) URL.revokeObjectURL(el.imagePreview.src);
    if (!file) {
      el.imagePreview.hidden = true;
      el.imagePreview.removeAttribute("src");
      return;
    }
    el.imagePreview.src = URL.createObjectURL(file);
    el.imagePreview.hidden = false;
  }

  function buildForm() {
    const m = selectedModel();
    const body = new FormData();
    body.append("prompt", el.prompt.value.trim());
    body.append("model", m.id);
    body.append("size", el.size.value);
    body.append("seconds", el.seconds.value);
    const optional = [
      ["negative_prompt", el.negativePrompt.value.trim()],
      ["seed", el.seed.value.trim()],
      ["num_inference_steps", el.steps.value.trim()],
      ["guidance_scale", el.guidance.value.trim()],
    ];
    for (const [name, value] of optional) if (value !== "") body.append(name, value);
    if (m.task === "image-to-video" && el.image.files[0]) body.append("input_reference", el.image.files[0]);
    return body;
  }

  const FIELD_OF_PARAM = {
    prompt: "prompt",
    model: "model",
    size: "size",
    seconds: "seconds",
    input_reference: "image",
    negative_prompt: "negative-prompt",
    seed: "seed",
    num_inference_steps: "steps",
    guidance_scale: "guidance",
  };

  function focusParam(param) {
    const id = param && FIELD_OF_PARAM[param.split(".")[0]];
    const field = id && $(id);
    if (!field) return;
    const details = field.closest("details");
    if (details) details.open = true;
    field.focus();
  }

  async function onSubmit(event) {
    event.preventDefault();
    clearError(el.formError);
    const m = selectedModel();
    if (!el.prompt.value.trim()) {
      showError(el.formError, new ApiError(0, "Write a prompt first.", "prompt"));
      el.prompt.focus();
      return;
    }
    if (m && m.task === "image-to-video" && !(el.image.files && el.image.files[0])) {
      showError(el.formError, new ApiError(0, "This model starts from an image: choose one.", "input_reference"));
      el.image.focus();
      return;
    }
    el.generate.disabled = true;
    el.generate.textContent = "Submitting…";
    try {
      const video = await getJson("/v1/videos", { method: "POST", body: buildForm() });
      showJob(video);
      refreshRecent();
    } catch (err) {
      showError(el.formError, err);
      if (err instanceof ApiError && err.status === 401) el.key.focus();
      else if (err instanceof ApiError) focusParam(err.param);
    } finally {
      el.generate.textContent = "Generate";
      el.generate.disabled = !(selectedModel() && selectedModel().online);
    }
  }

  // -- the current job -----------------------------------------------------------------------------------

  function statusLabel(video) {
    if (video.status === "failed" && video.error && video.error.code === "cancelled") return "cancelled";
    return video.status.replace("_", " ");
  }

  function progressText(video) {
    if (video.status === "queued") {
      const pos = video.queue_position;
      if (pos === 0) return "Queued: next in line";
      if (Number.isInteger(pos)) return `Queued: ${pos} ${pos === 1 ? "job" : "jobs"} ahead`;
      return "Queued";
    }
    if (video.status === "in_progress") {
      let text = `Generating: ${video.progress}%`;
      const eta = etaSeconds(video);
      if (eta !== null) text += `, about ${formatDuration(eta)} left`;
      return text;
    }
    if (video.status === "completed") {
      const took = video.completed_at && video.created_at ? video.completed_at - video.created_at : null;
      return took === null ? "Done" : `Done in ${formatDuration(took)}`;
    }
    return video.error && video.error.code === "cancelled" ? "Cancelled" : "Failed";
  }

  function etaSeconds(video) {
    const now = Date.now() / 1000;
    // The server's estimate first; once it has passed (or without one), extrapolate from how fast progress
    // has moved since we first saw it.
    if (video.estimated_completion_at > now) return video.estimated_completion_at - now;
    if (!state.rate) {
      state.rate = { t: now, p: video.progress };
      return null;
    }
    const moved = video.progress - state.rate.p;
    if (moved <= 0 || now - state.rate.t < 0.5) return null;
    return ((100 - video.progress) * (now - state.rate.t)) / moved;
  }

  function announce(video) {
    // A quarter-step granularity keeps a screen reader informed without reading out every denoising step.
    const quarter = video.status === "in_progress" ? ` ${Math.floor(video.progress / 25) * 25}%` : "";
    const text = `${statusLabel(video)}${quarter}`;
    if (text !== state.announced) {
      state.announced = text;
      el.jobLive.textContent = `Video ${text}`;
    }
  }

  function render(video) {
    if (!state.current || state.current.id !== video.id) return;
    state.current = video;
    el.job.dataset.status = video.status;
    el.jobStatus.textContent = statusLabel(video);
    const cancelled = video.status === "failed" && video.error?.code === "cancelled";
    el.jobStatus.dataset.status = cancelled ? "cancelled" : video.status;
    el.jobId.textContent = video.id;
    el.jobPrompt.textContent = video.prompt || "";
    if (video.status === "queued") el.jobProgress.removeAttribute("value"); // indeterminate while waiting
    else el.jobProgress.value = video.progress;
    el.jobProgress.hidden = video.status === "completed";
    el.jobProgressText.textContent = progressText(video);
    announce(video);
    const failed = video.status === "failed" && video.error;
    el.jobError.hidden = !failed || video.error.code === "cancelled";
    el.jobError.textContent = failed ? `${video.error.message} (${video.error.code})` : "";
    const size = video.size.replace("x", " × ");
    el.jobDetails.textContent = `${video.model} · ${size} · ${video.seconds} s · seed ${video.seed}`;
    el.cancel.hidden = TERMINAL.has(video.status);
    el.cancel.disabled = false;
  }

  function resetPlayer() {
    el.player.removeAttribute("src");
    el.player.load();
    if (state.playerUrl) URL.revokeObjectURL(state.playerUrl);
    state.playerUrl = null;
    el.playerBox.hidden = true;
    el.download.hidden = true;
    el.download.removeAttribute("href");
  }

  function showJob(video) {
    if (state.follow) state.follow.abort();
    state.follow = null;
    state.rate = null;
    state.announced = "";
    state.current = video;
    resetPlayer();
    clearError(el.jobError);
    el.jobEmpty.hidden = true;
    el.job.hidden = false;
    el.del.disabled = false;
    render(video);
    if (TERMINAL.has(video.status)) finish(video);
    else follow(video.id);
  }

  async function follow(videoId) {
    const controller = new AbortController();
    state.follow = controller;
    try {
      let video = await followEvents(videoId, controller.signal);
      if (!video || !TERMINAL.has(video.status)) video = await poll(videoId, controller.signal);
      if (state.follow === controller) finish(video);
    } catch (err) {
      if (err.name !== "AbortError") showError(el.jobError, err);
    } finally {
      if (state.follow === controller) state.follow = null;
    }
  }

  // The event stream: `event: video` with the whole video object as data, until a terminal status. Returns
  // the last video seen, or null when the server has no stream (an older gateway: 404), so the caller polls.
  async function followEvents(videoId, signal) {
    let resp;
    try {
      resp = await fetch(apiUrl(`/v1/videos/${encodeURIComponent(videoId)}/events`), {
        headers: authHeaders({ Accept: "text/event-stream" }),
        signal,
        cache: "no-store",
      });
    } catch (err) {
      if (err.name === "AbortError") throw err;
      return null;
    }
    if (!resp.ok) {
      const err = await errorFrom(resp);
      if ((resp.status === 404 || resp.status === 405) && err.code !== "video_not_found") return null;
      throw err;
    }
    if (!(resp.headers.get("content-type") || "").startsWith("text/event-stream") || !resp.body) return null;

    const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    let event = "message";
    let data = [];
    let last = null;
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) return last;
        buffer += value;
        const lines = buffer.split(/\r\n|\r|\n/);
        buffer = lines.pop(); // an incomplete line waits for the next chunk
        for (const line of lines) {
          if (line === "") {
            if (data.length && (event === "video" || event === "message")) {
              last = parseJson(data.join("\n"));
              render(last);
              if (TERMINAL.has(last.status)) return last;
            }
            event = "message";
            data = [];
          } else if (!line.startsWith(":")) {
            const colon = line.indexOf(":");
            const name = colon < 0 ? line : line.slice(0, colon);
            const val = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
            if (name === "event") event = val;
            else if (name === "data") data.push(val);
          }
        }
      }
    } catch (err) {
      if (err.name === "AbortError") throw err;
      return last; // a broken stream: the caller polls from here
    } finally {
      reader.releaseLock();
    }
  }

  async function poll(videoId, signal) {
    for (;;) {
      const resp = await request(`/v1/videos/${encodeURIComponent(videoId)}`, { signal, cache: "no-store" });
      const video = parseJson(await resp.text());
      render(video);
      if (TERMINAL.has(video.status)) return video;
      await sleep(Number(resp.headers.get("openai-poll-after-ms")) || 1000, signal);
    }
  }

  async function finish(video) {
    render(video);
    refreshRecent();
    if (video.status !== "completed") return;
    try {
      const url = await fetchBlobUrl(video.id, "video");
      if (!state.current || state.current.id !== video.id) return URL.revokeObjectURL(url);
      state.playerUrl = url;
      el.player.src = url;
      el.playerBox.hidden = false;
      el.download.href = url;
      el.download.download = `${video.id}.mp4`;
      el.download.hidden = false;
    } catch (err) {
      showError(el.jobError, err);
    }
  }

  async function onCancel() {
    if (!state.current) return;
    el.cancel.disabled = true;
    try {
      render(await getJson(`/v1/videos/${encodeURIComponent(state.current.id)}/cancel`, { method: "POST" }));
    } catch (err) {
      showError(el.jobError, err);
      el.cancel.disabled = false;
    }
  }

  async function deleteVideo(video) {
    const label = video.prompt ? `“${video.prompt.slice(0, 60)}”` : video.id;
    if (!window.confirm(`Delete the video ${label}? This cannot be undone.`)) return false;
    await request(`/v1/videos/${encodeURIComponent(video.id)}`, { method: "DELETE" });
    const thumb = state.thumbs.get(video.id);
    if (thumb) URL.revokeObjectURL(thumb);
    state.thumbs.delete(video.id);
    if (state.current && state.current.id === video.id) {
      if (state.follow) state.follow.abort();
      state.current = null;
      resetPlayer();
      el.job.hidden = true;
      el.jobEmpty.hidden = false;
      el.jobEmpty.textContent = "Video deleted.";
    }
    return true;
  }

  async function onDelete() {
    if (!state.current) return;
    el.del.disabled = true;
    try {
      if (await deleteVideo(state.current)) await refreshRecent();
    } catch (err) {
      showError(el.jobError, err);
    } finally {
      el.del.disabled = false;
    }
  }

  // -- recent videos -------------------------------------------------------------------------------------

  let recentRequest = 0;

  async function refreshRecent() {
    const mine = ++recentRequest; // a slow answer must not overwrite a newer one
    let videos;
    try {
      videos = (await getJson(`/v1/videos?limit=${RECENT_LIMIT}`)).data;
    } catch (err) {
      if (mine === recentRequest) {
        el.recent.replaceChildren();
        el.recentEmpty.hidden = false;
        el.recentEmpty.textContent = `Cannot list videos: ${err.message}`;
      }
      return;
    }
    if (mine !== recentRequest) return;
    el.recentEmpty.hidden = videos.length > 0;
    el.recentEmpty.textContent = "No videos yet.";
    el.recent.replaceChildren(...videos.map(recentCard));
  }

  function recentCard(video) {
    const li = document.createElement("li");
    li.className = "card";
    li.dataset.videoId = video.id;
    li.dataset.status = video.status;

    const open = document.createElement("button");
    open.type = "button";
    open.className = "card-open";
    open.setAttribute("aria-label", `Open video: ${video.prompt || video.id}`);
    const frame = document.createElement("span");
    frame.className = "thumb";
    if (video.status === "completed") {
      const img = document.createElement("img");
      img.alt = "";
      frame.append(img);
      loadThumb(video.id, img);
    } else {
      frame.textContent = statusLabel(video);
      frame.classList.add("thumb-status");
    }
    const caption = document.createElement("span");
    caption.className = "card-prompt";
    caption.textContent = video.prompt || video.id;
    open.append(frame, caption);
    open.addEventListener("click", () => {
      showJob(video);
      el.job.scrollIntoView({ behavior: "smooth", block: "nearest" });
    });

    const meta = document.createElement("div");
    meta.className = "card-meta";
    const info = document.createElement("span");
    // A thumbnail already says "completed"; other states are spelled out on the picture's place.
    info.textContent = `${video.size.replace("x", "×")} · ${video.seconds} s`;
    const del = document.createElement("button");
    del.type = "button";
    del.className = "danger small";
    del.textContent = "Delete";
    del.setAttribute("aria-label", `Delete video: ${video.prompt || video.id}`);
    del.addEventListener("click", async () => {
      del.disabled = true;
      try {
        if (await deleteVideo(video)) await refreshRecent();
      } catch (err) {
        el.recentEmpty.hidden = false;
        el.recentEmpty.textContent = `Cannot delete: ${err.message}`;
      } finally {
        del.disabled = false;
      }
    });
    meta.append(info, del);
    li.append(open, meta);
    return li;
  }

  async function loadThumb(videoId, img) {
    let url = state.thumbs.get(videoId);
    if (!url) {
      try {
        url = await fetchBlobUrl(videoId, "thumbnail");
      } catch (_) {
        img.replaceWith(document.createTextNode("no preview"));
        return;
      }
      state.thumbs.set(videoId, url);
    }
    img.src = url;
  }

  // -- start ---------------------------------------------------------------------------------------------

  function onKeyChange() {
    localStorage.setItem(KEY_STORAGE, el.key.value.trim());
    for (const url of state.thumbs.values()) URL.revokeObjectURL(url);
    state.thumbs.clear();
    loadModels();
    refreshRecent();
  }

  function init() {
    el.key.value = localStorage.getItem(KEY_STORAGE) || "";
    el.key.addEventListener("change", onKeyChange);
    el.keyToggle.addEventListener("click", () => {
      const show = el.key.type === "password";
      el.key.type = show ? "text" : "password";
      el.keyToggle.textContent = show ? "Hide" : "Show";
      el.keyToggle.setAttribute("aria-pressed", String(show));
    });
    el.model.addEventListener("change", onModelChange);
    el.image.addEventListener("change", onImageChange);
    el.form.addEventListener("submit", onSubmit);
    el.prompt.addEventListener("keydown", (e) => {
      if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) el.form.requestSubmit();
    });
    el.cancel.addEventListener("click", onCancel);
    el.del.addEventListener("click", onDelete);
    el.refresh.addEventListener("click", refreshRecent);
    loadModels();
    refreshRecent();
  }

  init();
})();
