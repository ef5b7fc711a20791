// personatune web chat: pick a persona, chat with streamed answers (OpenAI SSE chunks).
// Plain JS, no network beyond this server.
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  models: {},        // id -> model card from /v1/models
  histories: {},     // persona id -> [{role, content}]
  controller: null,  // AbortController of the answer being streamed
};

function apiKey() {
  return localStorage.getItem("personatune-api-key") || "";
}

function headers() {
  const h = { "Content-Type": "application/json" };
  if (apiKey()) h["Authorization"] = "Bearer " + apiKey();
  return h;
}

function notice(text) {
  $("notice").textContent = text || "";
  $("notice").hidden = !text;
}

async function errorText(res) {
  try {
    const body = await res.json();
    return (body.error && body.error.message) || res.statusText;
  } catch (e) {
    return res.statusText;
  }
}

async function loadModels() {
  const res = await fetch("/v1/models", { headers: headers() });
  if (res.status === 401) {
    $("key-box").hidden = false;
    notice("This server needs an API key.");
    return;
  }
  if (!res.ok) {
    notice("Could not list personas: " + (await errorText(res)));
    return;
  }
  $("key-box").hidden = true;
  notice("");
  const { data } = await res.json();
  const select = $("persona");
  select.textContent = "";
  // Personas first, the plain base model last.
  data.sort((a, b) => Number(b.persona) - Number(a.persona));
  for (const m of data) {
    state.models[m.id] = m;
    state.histories[m.id] = state.histories[m.id] || [];
    const opt = document.createElement("option");
    opt.value = m.id;
    opt.textContent = m.persona ? m.id : m.id + " (no persona)";
    select.appendChild(opt);
  }
  showPersona();
}

function current() {
  return $("persona").value;
}

function showPersona() {
  const m = state.models[current()];
  $("description").textContent = m ? m.description : "";
  render();
}

function bubble(role, text, who) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  const label = document.createElement("span");
  label.className = "who";
  label.textContent = who;
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;
  div.append(label, body);
  $("log").appendChild(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

function render() {
  $("log").textContent = "";
  for (const m of state.histories[current()] || []) {
    bubble(m.role, m.content, m.role === "user" ? "you" : current());
  }
}

function busy(on) {
  $("send").disabled = on;
  $("persona").disabled = on;
  $("reset").disabled = on;
  $("stop").hidden = !on;
}

async function send(text) {
  const persona = current();
  const history = state.histories[persona];
  history.push({ role: "user", content: text });
  bubble("user", text, "you");
  const div = bubble("assistant", "", persona);
  div.dataset.state = "streaming";
  const out = div.querySelector(".text");
  notice("");
  busy(true);
  state.controller = new AbortController();
  let answer = "";
  try {
    const res = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: headers(),
      signal: state.controller.signal,
      body: JSON.stringify({
        model: persona,
        messages: history,
        stream: true,
        temperature: Number($("temperature").value),
        max_tokens: Number($("max-tokens").value),
      }),
    });
    if (!res.ok) throw new Error(await errorText(res));
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    let finished = false;
    while (!finished) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const data = line.slice(6);
          if (data === "[DONE]") { finished = true; break; }
          const chunk = JSON.parse(data);
          if (chunk.error) throw new Error(chunk.error.message);
          const delta = chunk.choices.length ? chunk.choices[0].delta : {};
          if (delta.content) {
            answer += delta.content;
            out.textContent = answer;
            div.scrollIntoView({ block: "end" });
          }
        }
      }
    }
    history.push({ role: "assistant", content: answer });
    div.dataset.state = "done";
  } catch (e) {
    if (e.name === "AbortError") {
      history.push({ role: "assistant", content: answer });
      div.dataset.state = "done";
    } else {
      history.pop();  // the question was not answered: let the user send it again
      div.classList.add("error");
      div.dataset.state = "error";
      out.textContent = answer || "(no answer)";
      notice(e.message);
      if (/API key/.test(e.message)) $("key-box").hidden = false;
    }
  } finally {
    state.controller = null;
    busy(false);
  }
}

$("composer").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const text = $("input").value.trim();
  if (!text || state.controller) return;
  $("input").value = "";
  send(text);
});

$("input").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey) {
    ev.preventDefault();
    $("composer").requestSubmit();
  }
});

$("stop").addEventListener("click", () => state.controller && state.controller.abort());
$("persona").addEventListener("change", showPersona);
$("reset").addEventListener("click", () => {
  state.histories[current()] = [];
  render();
  notice("");
});
$("save-key").addEventListener("click", () => {
  localStorage.setItem("personatune-api-key", $("api-key").value.trim());
  loadModels();
});

loadModels();
