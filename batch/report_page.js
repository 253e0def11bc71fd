// The morning report's before/after pairs: drawn a page at a time from the data in the page
// (a 20,000-image batch opens at once), previews loaded as they scroll into view, and a click
// opening the full-size pair side by side or under a slider.
"use strict";
(function () {
  const PAGE = 200;
  const pairs = JSON.parse(document.getElementById("pairs-data").textContent);
  const grid = document.getElementById("pairs");
  const filter = document.getElementById("filter");
  const pager = document.getElementById("pager");
  const viewer = document.getElementById("viewer");
  let shown = pairs;
  let page = 0;
  let current = -1;

  function el(tag, attrs, text) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    if (text) node.textContent = text;
    return node;
  }

  function figure(label, src) {
    const fig = el("figure");
    fig.appendChild(el("img", {class: "thumb", alt: label, loading: "lazy", src: src}));
    fig.appendChild(el("figcaption", {}, label));
    return fig;
  }

  function draw() {
    grid.textContent = "";
    const pages = Math.max(1, Math.ceil(shown.length / PAGE));
    page = Math.min(page, pages - 1);
    shown.slice(page * PAGE, (page + 1) * PAGE).forEach((p, i) => {
      const box = el("div", {class: "pair", tabindex: "0", "data-index": page * PAGE + i});
      box.appendChild(figure("before", p.before));
      box.appendChild(figure("after", p.after));
      box.appendChild(el("div", {class: "name"}, p.name));
      if (p.note) box.appendChild(el("div", {class: "note"}, p.note));
      grid.appendChild(box);
    });
    pager.textContent = "";
    if (pages > 1) {
      const prev = el("button", {type: "button"}, "\u2190 previous");
      const next = el("button", {type: "button"}, "next \u2192");
      prev.disabled = page === 0;
      next.disabled = page === pages - 1;
      prev.onclick = () => { page -= 1; draw(); };
      next.onclick = () => { page += 1; draw(); };
      pager.append(prev, el("span", {}, ` page ${page + 1} of ${pages} `), next);
    }
    document.getElementById("shown").textContent =
      shown.length === pairs.length ? `${pairs.length}` : `${shown.length} of ${pairs.length}`;
  }

  function open(index) {
    current = index;
    const p = shown[index];
    viewer.querySelector(".title").textContent = `${p.name}${p.note ? " \u2014 " + p.note : ""}`;
    viewer.querySelectorAll("img").forEach((img) => {
      img.dataset.fellBack = "";
      img.src = img.classList.contains("before") ? p.full_before : p.full_after;
    });
    viewer.classList.add("open");
    viewer.querySelector(".close").focus();
  }

  function close() { viewer.classList.remove("open"); current = -1; }

  function step(by) {
    if (current < 0) return;
    const next = Math.min(shown.length - 1, Math.max(0, current + by));
    page = Math.floor(next / PAGE);
    open(next);
  }

  function mode(sliding) {
    viewer.classList.toggle("sliding", sliding);
    viewer.querySelector(".mode-side").setAttribute("aria-pressed", String(!sliding));
    viewer.querySelector(".mode-slider").setAttribute("aria-pressed", String(sliding));
  }

  grid.addEventListener("click", (event) => {
    const box = event.target.closest(".pair");
    if (box) open(Number(box.dataset.index));
  });
  grid.addEventListener("keydown", (event) => {
    const box = event.target.closest(".pair");
    if (box && event.key === "Enter") open(Number(box.dataset.index));
  });
  // A full-size file that cannot be reached (a source on another machine) shows its preview.
  viewer.querySelectorAll("img").forEach((img) => img.addEventListener("error", () => {
    const p = shown[current];
    if (!p || img.dataset.fellBack) return;
    img.dataset.fellBack = "1";
    img.src = img.classList.contains("before") ? p.before : p.after;
  }));
  viewer.querySelector(".close").onclick = close;
  viewer.querySelector(".prev").onclick = () => step(-1);
  viewer.querySelector(".next").onclick = () => step(1);
  viewer.querySelector(".mode-side").onclick = () => mode(false);
  viewer.querySelector(".mode-slider").onclick = () => mode(true);
  viewer.querySelector(".slider input").addEventListener("input", (event) => {
    viewer.querySelector(".slider .after").style.clipPath = `inset(0 0 0 ${event.target.value}%)`;
  });
  document.addEventListener("keydown", (event) => {
    if (current < 0) return;
    if (event.key === "Escape") close();
    if (event.key === "ArrowLeft") step(-1);
    if (event.key === "ArrowRight") step(1);
  });
  filter.addEventListener("input", () => {
    const needle = filter.value.toLowerCase();
    shown = needle ? pairs.filter((p) => p.name.toLowerCase().includes(needle)) : pairs;
    page = 0;
    draw();
  });
  draw();
  // For a link or a check that wants one pair open: report.html#view=3
  const wanted = /#view=(\d+)/.exec(location.hash);
  if (wanted && Number(wanted[1]) < shown.length) open(Number(wanted[1]));
  if (/[#&]slider/.test(location.hash)) mode(true);
})();
