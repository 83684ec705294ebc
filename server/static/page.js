// The token reward page: sends the prompt and response(s) to POST /score and shows each
// response by the character spans of its tokens, every token coloured by its reward.
// Plain JavaScript, no build step, nothing loaded from elsewhere.
"use strict";

(() => {
  const KEY_STORE = "tokenrm.apiKey"; // sessionStorage only: gone with the tab, never in a URL
  const NEGATIVE = [215, 48, 39];     // reward -1
  const NEUTRAL = [255, 255, 255];    // reward 0
  const POSITIVE = [33, 102, 172];    // reward +1
  const WORST = 5;                    // how many of the most negative tokens to list

  // The demo model's task: facts in the prompt, a response that should state them.
  const PROMPT = "Facts: Sheizai is 49 years old. Sheizai lives in Porto. Sheizai works as a " +
    "dentist. Sheizai has a cat. Question: Describe Sheizai for me.";
  const STEM = "Sheizai is 49 years old. Sheizai lives in Porto. Sheizai works as a ";
  const GARDENER = STEM + "gardener.";
  const DENTIST = STEM + "dentist.";
  const EXAMPLES = {
    gardener: [GARDENER],
    dentist: [DENTIST],
    oslo: ["Sheizai is 52 years old. Sheizai lives in Oslo. Sheizai works as a dentist. " +
           "Sheizai has a cat."],
    compare: [GARDENER, DENTIST],
  };

  const $ = (id) => document.getElementById(id);

  // ------------------------------------------------------------ colours and numbers

  /** [r, g, b] for a reward: white at 0, towards red below and blue above, clamped to ±1. */
  function rewardColor(reward) {
    const clamped = Math.max(-1, Math.min(1, reward));
    const end = clamped < 0 ? NEGATIVE : POSITIVE;
    const t = Math.abs(clamped);
    return NEUTRAL.map((n, i) => Math.round(n + t * (end[i] - n)));
  }

  const css = (rgb) => `rgb(${rgb.join(", ")})`;

  /** Dark text on light backgrounds, white on dark ones. */
  function textColor(rgb) {
    const [r, g, b] = rgb;
    return 0.299 * r + 0.587 * g + 0.114 * b < 140 ? "#fff" : "#111";
  }

  /** A signed number with a real minus sign: "−1.32", "+3.71", "0.00". */
  function signed(x, digits) {
    const text = Math.abs(x).toFixed(digits);
    if (Number(text) === 0) return text;
    return (x < 0 ? "\u2212" : "+") + text;
  }

  // ------------------------------------------------------------ rendering

  /** The text of each token: the response's own characters, by the token's [start, end). */
  function tokenTexts(response, result) {
    const chars = Array.from(response); // offsets count code points, as Python does
    return result.rewards.map((_, i) => {
      const span = result.offsets && result.offsets[i];
      if (span) return chars.slice(span[0], span[1]).join("");
      return result.tokens ? result.tokens[i] : "";
    });
  }

  function tokenElement(view, i, text) {
    const result = view.result;
    const el = document.createElement("span");
    const rgb = rewardColor(result.rewards[i]);
    el.className = "token";
    el.tabIndex = 0;
    el.dataset.index = String(i);
    el.dataset.reward = String(result.rewards[i]);
    el.dataset.tokenId = String(result.token_ids[i]);
    el.style.backgroundColor = css(rgb);
    el.style.color = textColor(rgb);
    el.textContent = text;
    if (!text) el.classList.add("empty"); // shares its characters with the token before it
    const show = () => showDetails(view, i);
    el.addEventListener("mouseenter", show);
    el.addEventListener("focus", show);
    return el;
  }

  /** The response as the user wrote it: text between tokens as is, each token a span. */
  function renderTokens(container, view) {
    const result = view.result;
    const chars = Array.from(view.response);
    let cursor = 0;
    result.rewards.forEach((_, i) => {
      const span = result.offsets && result.offsets[i];
      let text = view.texts[i];
      if (span) {
        const start = Math.max(span[0], cursor);
        const end = Math.max(span[1], start);
        if (start > cursor) container.append(chars.slice(cursor, start).join(""));
        text = chars.slice(start, end).join("");
        cursor = end;
      }
      container.append(tokenElement(view, i, text));
    });
    if (result.offsets && cursor < chars.length) container.append(chars.slice(cursor).join(""));
  }

  function renderWorst(list, view, tokens) {
    const result = view.result;
    const worst = result.rewards.map((_, i) => i).filter((i) => result.rewards[i] < 0)
      .sort((a, b) => result.rewards[a] - result.rewards[b]).slice(0, WORST);
    if (!worst.length) {
      const li = document.createElement("li");
      li.className = "none";
      li.textContent = "no token has a negative reward";
      list.append(li);
    }
    for (const i of worst) {
      const li = document.createElement("li");
      li.dataset.index = String(i);
      const code = document.createElement("code");
      // A token with no characters of its own (a space split off): its token string instead.
      code.textContent = JSON.stringify(view.texts[i] || (result.tokens ? result.tokens[i] : ""));
      const value = document.createElement("span");
      value.className = "reward";
      value.textContent = signed(result.rewards[i], 3);
      li.append(code, " ", value);
      li.addEventListener("mouseenter", () => {
        showDetails(view, i);
        tokens.querySelector(`.token[data-index="${i}"]`).classList.add("active");
      });
      list.append(li);
    }
  }

  function renderResult(result, response, title) {
    const view = {result, response, title, texts: tokenTexts(response, result)};
    const node = $("result-template").content.firstElementChild.cloneNode(true);
    node.querySelector(".result-title").textContent = title;
    const total = node.querySelector(".total");
    total.textContent = signed(result.total, 2);
    total.dataset.total = String(result.total);
    const n = result.rewards.length;
    node.querySelector(".count").textContent = `(${n} token${n === 1 ? "" : "s"})`;
    const tokens = node.querySelector(".tokens");
    renderTokens(tokens, view);
    renderWorst(node.querySelector(".worst"), view, tokens);
    return node;
  }

  function render(answer, responses) {
    const results = $("results");
    results.replaceChildren();
    results.classList.toggle("two", responses.length > 1);
    answer.results.forEach((result, i) => {
      const title = responses.length > 1 ? `Response ${"AB"[i]}` : "Response";
      results.append(renderResult(result, responses[i], title));
    });
    $("model-name").textContent = answer.model;
    $("model-version").textContent = answer.model_version;
    $("model").hidden = false;
    clearDetails();
  }

  // ------------------------------------------------------------ the details panel

  function showDetails(view, i) {
    for (const el of document.querySelectorAll(".token.active")) el.classList.remove("active");
    const result = view.result;
    const span = result.offsets && result.offsets[i];
    const rgb = rewardColor(result.rewards[i]);
    $("detail-text").textContent = JSON.stringify(view.texts[i]);
    $("detail-token").textContent = result.tokens ? JSON.stringify(result.tokens[i]) : "—";
    $("detail-id").textContent = String(result.token_ids[i]);
    $("detail-reward").textContent = signed(result.rewards[i], 3);
    $("detail-reward").style.backgroundColor = css(rgb);
    $("detail-reward").style.color = textColor(rgb);
    $("detail-offsets").textContent = span ? `[${span[0]}, ${span[1]})` : "—";
    $("detail-index").textContent = `${i + 1} of ${result.rewards.length} (${view.title})`;
    $("details-empty").hidden = true;
    $("details-body").hidden = false;
  }

  function clearDetails() {
    $("details-empty").hidden = false;
    $("details-body").hidden = true;
  }

  // ------------------------------------------------------------ talking to the server

  function setStatus(state, message) {
    document.body.dataset.state = state;
    $("status").textContent = message;
    $("status").classList.toggle("error", state === "error");
  }

  /** One readable line for an error answer ({"error": {code, message, item, field}}). */
  function errorLine(status, body, retryAfter, hadKey, compared) {
    const error = body && body.error;
    if (status === 401) {
      $("api-key").classList.add("attention");
      $("api-key").focus();
      return hadKey ? "The server refused this API key (401): enter a valid one and press Score."
        : "This server needs an API key (401): enter it in the API key field and press Score.";
    }
    if (!error) return `Error ${status}: the server's answer is not a tokenrm error.`;
    let where = "";
    if (typeof error.item === "number") {
      where += compared > 1 ? `, response ${"AB"[error.item] || error.item}` : "";
    }
    if (error.field) where += `, field ${error.field}`;
    const retry = retryAfter ? ` (try again in ${retryAfter} s)` : "";
    return `Error ${status} (${error.code}${where}): ${error.message}${retry}`;
  }

  function headers() {
    const h = {"content-type": "application/json"};
    const key = $("api-key").value.trim();
    if (key) h.authorization = `Bearer ${key}`;
    return h;
  }

  async function score() {
    if ($("score").disabled) return; // one request at a time (Ctrl+Enter while scoring)
    const prompt = $("prompt").value;
    const responses = [$("response-a").value];
    if ($("compare").checked) responses.push($("response-b").value);
    const sent = headers();
    setStatus("scoring", "Scoring…");
    $("score").disabled = true;
    try {
      const answer = await fetch("score", {
        method: "POST", headers: sent, cache: "no-store", credentials: "omit",
        body: JSON.stringify({items: responses.map((response) => ({prompt, response})),
                              return_tokens: true}),
      });
      const body = await answer.json().catch(() => null);
      if (!answer.ok || !body || !Array.isArray(body.results) ||
          body.results.length !== responses.length) {
        $("results").replaceChildren();
        const line = answer.ok ? "The server's answer is not a /score answer."
          : errorLine(answer.status, body, answer.headers.get("retry-after"),
                      "authorization" in sent, responses.length);
        setStatus("error", line);
        return;
      }
      $("api-key").classList.remove("attention");
      render(body, responses);
      setStatus("scored", "");
    } catch (err) {
      $("results").replaceChildren();
      setStatus("error", `Could not reach the server: ${err.message}`);
    } finally {
      $("score").disabled = false;
    }
  }

  // ------------------------------------------------------------ inputs

  function setCompare(on) {
    $("compare").checked = on;
    document.body.classList.toggle("compare", on);
  }

  function pickExample() {
    const responses = EXAMPLES[$("example").value];
    if (!responses) return;
    $("prompt").value = PROMPT;
    $("response-a").value = responses[0];
    $("response-b").value = responses[1] || "";
    setCompare(responses.length > 1);
  }

  function storedKey(value) {
    try {
      if (value === undefined) return sessionStorage.getItem(KEY_STORE) || "";
      if (value) sessionStorage.setItem(KEY_STORE, value);
      else sessionStorage.removeItem(KEY_STORE);
    } catch (err) {
      return ""; // storage refused (a privacy mode): the key lives in the field only
    }
    return value;
  }

  function start() {
    $("legend-bar").style.background =
      `linear-gradient(to right, ${css(NEGATIVE)}, ${css(NEUTRAL)}, ${css(POSITIVE)})`;
    $("api-key").value = storedKey();
    $("api-key").addEventListener("input", (e) => storedKey(e.target.value.trim()));
    $("forget-key").addEventListener("click", () => { $("api-key").value = ""; storedKey(""); });
    $("example").addEventListener("change", pickExample);
    $("compare").addEventListener("change", (e) => setCompare(e.target.checked));
    for (const id of ["prompt", "response-a", "response-b"]) {
      $(id).addEventListener("input", () => { $("example").value = ""; });
    }
    $("score").addEventListener("click", score);
    for (const id of ["prompt", "response-a", "response-b"]) { // Ctrl+Enter scores
      $(id).addEventListener("keydown", (e) => {
        if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) score();
      });
    }
    $("results").addEventListener("mouseleave", () => {
      for (const el of document.querySelectorAll(".token.active")) el.classList.remove("active");
    });
    setCompare($("compare").checked);
  }

  start();
})();
