/* The pruning-lab dashboard (experiments/dashboard.py writes the data; this draws it). No network: plotly.js and
   the data are inline. State (tab, filters, sort, open record, selections) survives the served page's reloads. */
(function () {
  'use strict';
  var D = JSON.parse(document.getElementById('dashboard-data').textContent);
  var STATE_KEY = 'pruning-lab-dashboard:' + D.store;
  var state = {tab: 'explorer', filters: {}, search: '', sort: {key: 'created', dir: -1}, open: null};
  try { Object.assign(state, JSON.parse(sessionStorage.getItem(STATE_KEY) || '{}')); } catch (e) { /* fresh */ }
  function save() { try { sessionStorage.setItem(STATE_KEY, JSON.stringify(state)); } catch (e) { /* private mode */ } }

  function el(tag, attrs, children) {
    var e = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) {
      if (k === 'text') { e.textContent = attrs[k]; } else if (k === 'html') { e.innerHTML = attrs[k]; }
      else if (k.slice(0, 2) === 'on') { e.addEventListener(k.slice(2), attrs[k]); } else { e.setAttribute(k, attrs[k]); }
    });
    (children || []).forEach(function (c) { if (c) { e.appendChild(typeof c === 'string' ? document.createTextNode(c) : c); } });
    return e;
  }
  function uniq(a) { return Array.from(new Set(a.filter(function (x) { return x !== null && x !== undefined && x !== ''; }))).sort(); }
  function fmt(v, d) { return (v === null || v === undefined) ? '' : (typeof v === 'number' ? v.toFixed(d === undefined ? 2 : d) : String(v)); }
  function pct(v) { return v === null || v === undefined ? '' : (100 * v).toFixed(0) + '%'; }
  function style(m) { return D.styles[m] || {color: '#7f7f7f', symbol: 'circle'}; }
  function select(id, label, options, value, onchange, allLabel) {
    var s = el('select', {id: id});
    if (allLabel) { s.appendChild(el('option', {value: '', text: allLabel})); }
    options.forEach(function (o) { var v = typeof o === 'object' ? o.value : o; s.appendChild(el('option', {value: v, text: typeof o === 'object' ? o.text : o})); });
    if (value !== undefined && value !== null && Array.prototype.some.call(s.options, function (o) { return o.value === String(value); })) { s.value = String(value); }
    s.addEventListener('change', function () { onchange(s.value); });
    return el('label', {}, [label, s]);
  }

  // ------------------------------------------------------------------ layout
  var header = el('header', {}, [
    el('h1', {text: 'Pruning results dashboard'}),
    el('div', {class: 'meta', id: 'meta', text: 'store: ' + D.store + ' \u00b7 ' + D.n_records + ' records \u00b7 built ' + D.generated +
      (D.version ? ' \u00b7 version ' + D.version : '')})
  ]);
  D.warnings.forEach(function (w) { header.appendChild(el('div', {class: 'warn', text: 'could not build ' + w})); });
  var tabs = [['explorer', 'Results explorer'], ['quality', 'Quality vs size'], ['widths', 'Kept widths'],
    ['tables', 'Paper tables'], ['bench', 'Benchmarks & studies'], ['sweep', 'Sweep progress']];
  var nav = el('nav', {}, tabs.map(function (t) {
    return el('button', {'data-tab': t[0], id: 'tab-' + t[0], text: t[1], onclick: function () { show(t[0]); }});
  }));
  header.appendChild(nav);
  document.body.appendChild(header);
  var main = el('main');
  document.body.appendChild(main);
  var sections = {};
  tabs.forEach(function (t) { sections[t[0]] = el('section', {id: 'view-' + t[0]}); main.appendChild(sections[t[0]]); });
  var drawn = {};
  function show(name) {
    state.tab = name; save();
    tabs.forEach(function (t) {
      sections[t[0]].classList.toggle('active', t[0] === name);
      document.getElementById('tab-' + t[0]).classList.toggle('active', t[0] === name);
    });
    if (!drawn[name]) { drawn[name] = true; DRAW[name](); }  // plotly needs a visible div to size itself
  }

  // ------------------------------------------------------------------ explorer
  var COLS = [['model', 'model', 't'], ['method', 'method', 't'], ['ratio', 'ratio', 'p'], ['achieved', 'achieved', 'p3'],
    ['protocol', 'PPL protocol', 't'], ['ppl', 'PPL', 'n'], ['zs', 'zero-shot avg (%)', 'n'], ['calibration', 'calibration', 't'],
    ['seed', 'seed', 't'], ['recovery', 'recovery', 't'], ['created', 'created', 't'], ['wall_s', 'wall (s)', 'n1']];
  var FILTERS = [['model', 'model'], ['method', 'method'], ['protocol', 'protocol'], ['calibration', 'calibration'],
    ['seed', 'seed'], ['recovery', 'recovery']];
  var detail = el('aside', {id: 'detail'});
  document.body.appendChild(detail);

  function cell(r, c) {
    var v = r[c[0]];
    if (c[2] === 'p') { return pct(v); }
    if (c[2] === 'p3') { return fmt(v, 3); }
    if (c[2] === 'n1') { return fmt(v, 1); }
    if (c[2] === 'n') { return fmt(v, 2); }
    return fmt(v);
  }
  function filtered() {
    var q = (state.search || '').toLowerCase();
    return D.records.filter(function (r) {
      for (var i = 0; i < FILTERS.length; i++) {
        var f = state.filters[FILTERS[i][0]];
        if (f && String(r[FILTERS[i][0]]) !== f) { return false; }
      }
      return !q || JSON.stringify(r).toLowerCase().indexOf(q) >= 0;
    }).sort(function (a, b) {
      var k = state.sort.key, x = a[k], y = b[k];
      if (x === y) { return 0; }
      if (x === null || x === undefined) { return 1; }
      if (y === null || y === undefined) { return -1; }
      return (x < y ? -1 : 1) * state.sort.dir;
    });
  }
  function drawExplorer() {
    var s = sections.explorer;
    s.innerHTML = '';
    var bar = el('div', {class: 'filters'});
    FILTERS.forEach(function (f) {
      bar.appendChild(select('f-' + f[0], f[1], uniq(D.records.map(function (r) { return String(r[f[0]] === null ? '' : r[f[0]]); })),
        state.filters[f[0]] || '', function (v) { state.filters[f[0]] = v; save(); drawRows(); }, 'all'));
    });
    var search = el('input', {id: 'f-search', type: 'search', placeholder: 'any text'});
    search.value = state.search || '';
    search.addEventListener('input', function () { state.search = search.value; save(); drawRows(); });
    bar.appendChild(el('label', {}, ['search', search]));
    bar.appendChild(el('span', {id: 'count', class: 'meta'}));
    s.appendChild(bar);
    var thead = el('tr', {}, COLS.map(function (c) {
      return el('th', {'data-key': c[0], text: c[1], onclick: function () {
        state.sort = {key: c[0], dir: state.sort.key === c[0] ? -state.sort.dir : 1}; save(); drawRows();
      }});
    }));
    s.appendChild(el('div', {class: 'scroll'}, [el('table', {id: 'records'}, [el('thead', {}, [thead]), el('tbody')])]));
    s.appendChild(el('p', {class: 'meta', text: 'Click a column to sort (again: reverse), a row to open its record. ' +
      'PPL: the first protocol of the record; zero-shot: its average as recorded (metric preset).'}));
    drawRows();
    if (state.open && D.details[state.open]) { openRecord(state.open); }
  }
  function drawRows() {
    var rows = filtered();
    var tbody = document.querySelector('#records tbody');
    tbody.innerHTML = '';
    rows.forEach(function (r) {
      var tr = el('tr', {'data-hash': r.hash, onclick: function () { openRecord(r.hash); }}, COLS.map(function (c) {
        var td = el('td', {class: c[2] === 't' ? 't' : '', text: cell(r, c)});
        if (c[0] === 'method') { td.insertBefore(el('span', {class: 'swatch', style: 'background:' + style(r.method).color}), td.firstChild); }
        return td;
      }));
      if (r.hash === state.open) { tr.classList.add('selected'); }
      tbody.appendChild(tr);
    });
    document.querySelectorAll('#records th').forEach(function (th) {
      th.classList.toggle('sorted-asc', th.dataset.key === state.sort.key && state.sort.dir > 0);
      th.classList.toggle('sorted-desc', th.dataset.key === state.sort.key && state.sort.dir < 0);
    });
    document.getElementById('count').textContent = rows.length + ' of ' + D.records.length + ' records';
  }
  function openRecord(hash) {
    var d = D.details[hash], r = D.records.find(function (x) { return x.hash === hash; });
    if (!d || !r) { return; }
    state.open = hash; save();
    document.querySelectorAll('#records tbody tr').forEach(function (tr) { tr.classList.toggle('selected', tr.dataset.hash === hash); });
    detail.innerHTML = '';
    detail.appendChild(el('button', {id: 'detail-close', text: 'close', onclick: function () {
      detail.classList.remove('open'); state.open = null; save();
    }}));
    detail.appendChild(el('h2', {text: r.method + ' \u00b7 ' + r.model + ' \u00b7 ' + pct(r.ratio)}));
    detail.appendChild(el('div', {class: 'meta', text: 'record ' + hash + ' \u00b7 created ' + r.created}));
    detail.appendChild(el('h3', {text: 'reproduce'}));
    detail.appendChild(el('pre', {id: 'reproduce', text: d.reproduce}));
    [['config', 'resolved config'], ['plan', 'plan (removed units per layer; the record keeps the index lists)'],
      ['timings', 'timings (s)'], ['versions', 'versions'], ['params', 'parameters']].forEach(function (p) {
      detail.appendChild(el('details', {open: 'open', id: 'detail-' + p[0]}, [el('summary', {text: p[1]}),
        el('pre', {text: JSON.stringify(d[p[0]], null, 2)})]));
    });
    detail.classList.add('open');
  }

  // ------------------------------------------------------------------ quality vs size
  var XAXES = {achieved: 'achieved ratio (share of all parameters removed)', params: 'parameters after pruning',
    macs: 'MACs', latency: 'measured latency (s)'};
  function keyDataset(key) { var p = String(key).split(':'); return p.length > 1 ? p[1] : ''; }
  function qualityPlot(div, kind, model, key, xaxis, showPub) {
    var pts = D.points.filter(function (p) { return p.kind === kind && p.model === model && p.key === key; });
    var traces = [], shapes = [];
    var dense = pts.filter(function (p) { return p.phase === 'dense'; });
    var pruned = pts.filter(function (p) { return p.phase !== 'dense'; });
    var methods = uniq(pruned.map(function (p) { return p.method; }));
    var unit = kind === 'ppl' ? 'PPL' : 'accuracy (%)';
    methods.forEach(function (m) {
      var g = pruned.filter(function (p) { return p.method === m && p[xaxis] !== undefined && p[xaxis] !== null; })
        .sort(function (a, b) { return a[xaxis] - b[xaxis]; });
      if (!g.length) { return; }
      var st = style(m), x = g.map(function (p) { return p[xaxis]; });
      var spread = g.filter(function (p) { return p.values.length > 1; });
      if (spread.length) {  // seed spread: a band from the seeds' min to max
        traces.push({x: x.concat(x.slice().reverse()), y: g.map(function (p) { return p.max; }).concat(g.map(function (p) { return p.min; }).reverse()),
          fill: 'toself', fillcolor: st.color + '26', line: {width: 0}, hoverinfo: 'skip', showlegend: false, legendgroup: m,
          name: m + ' seed spread', type: 'scatter', mode: 'lines'});
      }
      traces.push({
        type: 'scatter', mode: 'lines+markers', name: m, legendgroup: m, x: x, y: g.map(function (p) { return p.mean; }),
        marker: {color: st.color, symbol: st.symbol, size: 9, line: {width: 1, color: '#333'}}, line: {color: st.color, width: 1.5},
        error_y: {type: 'data', symmetric: false, color: st.color, thickness: 1.2, width: 4,
          array: g.map(function (p) { return p.ci ? p.ci[1] - p.mean : 0; }), arrayminus: g.map(function (p) { return p.ci ? p.mean - p.ci[0] : 0; })},
        customdata: g.map(function (p) {
          return [pct(p.ratio), fmt(p.achieved, 3), p.values.length, p.values.map(function (v) { return v.toFixed(2); }).join(', '),
            p.ci ? '[' + p.ci[0].toFixed(2) + ', ' + p.ci[1].toFixed(2) + ']' : 'none (no per-sample values in the record)', p.hashes.join(' ')];
        }),
        hovertemplate: '<b>' + m + '</b><br>ratio %{customdata[0]} (achieved %{customdata[1]})<br>' + unit +
          ' %{y:.2f} (mean of %{customdata[2]} seed(s): %{customdata[3]})<br>' + Math.round(100 * D.level) +
          '% sampling interval: %{customdata[4]}<br>record %{customdata[5]}<extra></extra>'
      });
    });
    if (dense.length) {
      var dv = dense[0].mean;
      shapes.push({type: 'line', xref: 'paper', x0: 0, x1: 1, y0: dv, y1: dv, line: {color: '#000', dash: 'dash', width: 1.2}});
      traces.push({type: 'scatter', mode: 'lines', x: [null], y: [null], name: 'dense ' + dv.toFixed(2) +
        (dense[0].ci ? ' [' + dense[0].ci[0].toFixed(2) + ', ' + dense[0].ci[1].toFixed(2) + ']' : ''),
        line: {color: '#000', dash: 'dash'}});
    }
    if (showPub !== 'none' && xaxis === 'achieved') {  // published rows: other models, full sets: marked apart
      var ds = keyDataset(key);
      var pub = D.anchors.filter(function (a) {
        return a.kind === kind && (kind === 'zeroshot' || a.dataset === ds) && a.ratio > 0 &&
          (showPub === 'all' || (a.ours && methods.indexOf(a.ours) >= 0));
      });
      uniq(pub.map(function (a) { return a.method + ' \u00b7 ' + a.model; })).forEach(function (name) {
        var g = pub.filter(function (a) { return a.method + ' \u00b7 ' + a.model === name; });
        var st = g[0].ours ? style(g[0].ours) : {color: '#7f7f7f', symbol: 'circle'};
        traces.push({type: 'scatter', mode: 'markers', name: 'published: ' + name, legendgroup: 'published',
          x: g.map(function (a) { return a.ratio; }), y: g.map(function (a) { return a.value; }),
          marker: {color: st.color, symbol: st.symbol + '-open', size: 11, line: {width: 2}},
          customdata: g.map(function (a) { return [a.printed, a.block, a.source, a.protocol, a.dataset]; }),
          hovertemplate: '<b>published: ' + name + '</b><br>%{customdata[4]} %{customdata[0]} at ratio %{x:.2f}' +
            '<br>(%{customdata[3]}, block %{customdata[1]})<br>%{customdata[2]}<extra></extra>'});
      });
    }
    var layout = {title: {text: model + ': ' + (kind === 'ppl' ? 'PPL ' : 'zero-shot ') + key, font: {size: 14}},
      xaxis: {title: {text: XAXES[xaxis]}, zeroline: false}, yaxis: {title: {text: unit}, type: kind === 'ppl' ? 'log' : 'linear'},
      shapes: shapes, hovermode: 'closest', legend: {font: {size: 10}}, margin: {t: 40, r: 10}};
    Plotly.react(div, traces, layout, {displaylogo: false, responsive: true});
  }
  function drawPaired(box, model, keys) {
    box.innerHTML = '';
    var rows = D.paired.filter(function (p) { return p.model === model && keys.indexOf(p.key) >= 0; });
    if (!rows.length) { return; }
    box.appendChild(el('h3', {text: 'Paired differences of neighbouring methods (same windows / documents, ' + Math.round(100 * D.level) + '% interval)'}));
    var tb = el('tbody');
    rows.forEach(function (p) {
      var d = p.what.indexOf('PPL') === 0 ? 3 : 1;
      tb.appendChild(el('tr', {}, [el('td', {class: 't', text: p.key}), el('td', {text: pct(p.ratio)}), el('td', {class: 't', text: p.a}),
        el('td', {class: 't', text: p.b}), el('td', {class: 't', text: p.what}),
        el('td', {text: p.estimate.toFixed(d) + ' [' + p.low.toFixed(d) + ', ' + p.high.toFixed(d) + ']'}),
        el('td', {class: p.resolved ? 'ok' : 'unresolved', text: p.resolved ? 'resolved' : 'not resolved'})]));
    });
    box.appendChild(el('table', {id: 'paired-table'}, [el('thead', {}, [el('tr', {}, ['metric', 'ratio', 'a', 'b', 'difference', 'estimate [low, high]', ''].map(function (h) { return el('th', {text: h}); }))]), tb]));
  }
  function mostCommon(xs) {
    var n = {}, best = xs[0];
    xs.forEach(function (x) { n[x] = (n[x] || 0) + 1; if (n[x] > n[best]) { best = x; } });
    return best;
  }
  function drawQuality() {
    var s = sections.quality;
    s.innerHTML = '';
    var models = uniq(D.points.map(function (p) { return p.model; }));
    if (!models.length) { s.appendChild(el('p', {class: 'warn', text: 'No PPL or zero-shot values in this store yet.'})); return; }
    var q = state.quality = state.quality || {};
    if (models.indexOf(q.model) < 0) { q.model = mostCommon(D.points.map(function (p) { return p.model; })); }  // the model with the most points first
    var bar = el('div', {class: 'filters'});
    s.appendChild(bar);
    var plots = el('div', {class: 'plots'}, [el('div', {class: 'plot', id: 'plot-ppl'}), el('div', {class: 'plot', id: 'plot-zs'})]);
    s.appendChild(plots);
    var pairedBox = el('div', {id: 'paired'});
    s.appendChild(pairedBox);
    s.appendChild(el('p', {class: 'meta', text: 'Markers: mean over calibration seeds, one colour and marker per method in every view; ' +
      'error bars: ' + Math.round(100 * D.level) + '% bootstrap interval over the windows / documents (sampling error; records ' +
      'without per-sample values have none); shaded bands: seed min\u2013max (seed spread, kept apart); dashed line: dense; ' +
      'open markers: published numbers (their own models and full test sets: a reference, not our measurement). Hover a point for its values.'}));
    function keys(kind) { return uniq(D.points.filter(function (p) { return p.kind === kind && p.model === q.model; }).map(function (p) { return p.key; })); }
    function axes() {
      var pts = D.points.filter(function (p) { return p.model === q.model; });
      return Object.keys(XAXES).filter(function (a) { return pts.some(function (p) { return p[a] !== undefined && p[a] !== null; }); });
    }
    function redraw() {
      bar.innerHTML = '';
      var pk = keys('ppl'), zk = keys('zeroshot'), ax = axes();
      if (pk.indexOf(q.ppl) < 0) { q.ppl = pk[0]; }
      if (zk.indexOf(q.zs) < 0) { q.zs = zk[0]; }
      if (ax.indexOf(q.x) < 0) { q.x = 'achieved'; }
      if (['matched', 'all', 'none'].indexOf(q.pub) < 0) { q.pub = 'matched'; }
      bar.appendChild(select('q-model', 'model', models, q.model, function (v) { q.model = v; save(); redraw(); }));
      bar.appendChild(select('q-ppl', 'PPL protocol', pk, q.ppl, function (v) { q.ppl = v; save(); redraw(); }));
      bar.appendChild(select('q-zs', 'zero-shot', zk, q.zs, function (v) { q.zs = v; save(); redraw(); }));
      bar.appendChild(select('q-x', 'x axis', ax.map(function (a) { return {value: a, text: XAXES[a]}; }), q.x, function (v) { q.x = v; save(); redraw(); }));
      bar.appendChild(select('q-pub', 'published anchors', [{value: 'matched', text: 'of the methods shown'},
        {value: 'all', text: 'all'}, {value: 'none', text: 'none'}], q.pub, function (v) { q.pub = v; save(); redraw(); }));
      save();
      if (q.ppl) { qualityPlot('plot-ppl', 'ppl', q.model, q.ppl, q.x, q.pub); } else { Plotly.purge('plot-ppl'); document.getElementById('plot-ppl').textContent = 'no PPL for this model'; }
      drawPaired(pairedBox, q.model, [q.ppl, q.zs]);
      if (q.zs) { qualityPlot('plot-zs', 'zeroshot', q.model, q.zs, q.x, q.pub); } else { Plotly.purge('plot-zs'); document.getElementById('plot-zs').textContent = 'no zero-shot average for this model'; }
    }
    redraw();
  }

  // ------------------------------------------------------------------ kept widths
  function heatmap(div, model, cellHash) {
    var W = D.widths[model], c = W.cells.find(function (x) { return x.hash === cellHash; });
    if (!c) { return; }
    var cols = [['num_heads', 'query heads'], ['num_kv_heads', 'KV groups'], ['intermediate_size', 'MLP channels']];
    if (W.cells.some(function (x) { return x.layers.some(function (l) { return l && l.hidden; }); })) { cols.push(['hidden', 'hidden']); }
    var z = [], text = [], custom = [];
    c.layers.forEach(function (l, i) {
      var d = W.dense[i] || {};
      z.push(cols.map(function (k) { return l === null ? 0 : (l[k[0]] && d[k[0]] ? l[k[0]] / d[k[0]] : null); }));
      text.push(cols.map(function (k) { return l === null ? 'removed' : String(l[k[0]] === null || l[k[0]] === undefined ? '' : l[k[0]]); }));
      custom.push(cols.map(function (k) { return l === null ? 'block removed' : String(l[k[0]]) + ' of ' + String(d[k[0]]); }));
    });
    var layers = c.layers.map(function (_, i) { return 'L' + i; });
    Plotly.react(div, [{type: 'heatmap', z: z, x: cols.map(function (k) { return k[1]; }), y: layers, text: text, customdata: custom,
      texttemplate: '%{text}', colorscale: 'Viridis', zmin: 0, zmax: 1, colorbar: {title: {text: 'kept / dense'}},
      hovertemplate: '%{y} %{x}: %{customdata} (%{z:.2f})<extra></extra>'}],
      {title: {text: c.label, font: {size: 13}}, yaxis: {autorange: 'reversed'}, margin: {t: 40, l: 50, r: 10},
        height: Math.max(360, 22 * c.layers.length + 120)},
      {displaylogo: false, responsive: true});
  }
  function drawWidths() {
    var s = sections.widths;
    s.innerHTML = '';
    var models = Object.keys(D.widths).filter(function (m) { return D.widths[m].cells.length; }).sort();
    if (!models.length) { s.appendChild(el('p', {class: 'warn', text: 'No record in this store holds per-layer widths.'})); return; }
    var w = state.widths = state.widths || {};
    if (models.indexOf(w.model) < 0) {
      w.model = models.reduce(function (a, b) { return D.widths[b].cells.length > D.widths[a].cells.length ? b : a; });
    }
    var bar = el('div', {class: 'filters'}), pair = el('div', {class: 'pair'}, [el('div', {class: 'heat', id: 'heat-left'}), el('div', {class: 'heat', id: 'heat-right'})]);
    var note = el('p', {class: 'meta'});
    s.appendChild(bar); s.appendChild(pair); s.appendChild(note);
    function redraw() {
      bar.innerHTML = '';
      var cells = D.widths[w.model].cells, hashes = cells.map(function (c) { return c.hash; });
      var opts = cells.map(function (c) { return {value: c.hash, text: c.label}; });
      if (hashes.indexOf(w.left) < 0) { w.left = hashes[0]; }
      if (hashes.indexOf(w.right) < 0) {  // by default another method beside the first
        var first = cells[0].label.split(' @')[0];
        var other = cells.find(function (c) { return c.label.split(' @')[0] !== first; });
        w.right = other ? other.hash : hashes[Math.min(1, hashes.length - 1)];
      }
      bar.appendChild(select('w-model', 'model', models, w.model, function (v) { w.model = v; save(); redraw(); }));
      bar.appendChild(select('w-left', 'left cell', opts, w.left, function (v) { w.left = v; save(); heatmap('heat-left', w.model, v); }));
      bar.appendChild(select('w-right', 'right cell', opts, w.right, function (v) { w.right = v; save(); heatmap('heat-right', w.model, v); }));
      note.textContent = 'colour: kept / dense width per layer; numbers: kept query heads, KV groups, MLP channels' +
        ' (hidden: a slicing method\u2019s kept width); \u201cremoved\u201d: the whole block was deleted. ' + (D.widths[w.model].dense_note || 'dense: the model\u2019s dense record.');
      save();
      heatmap('heat-left', w.model, w.left);
      heatmap('heat-right', w.model, w.right);
    }
    redraw();
  }

  // ------------------------------------------------------------------ tables, benchmarks, studies, sweep
  function drawTables() {
    var s = sections.tables;
    if (!D.tables.length) { s.appendChild(el('p', {class: 'warn', text: 'No paper table has rows of ours (protocols not in this store).'})); return; }
    s.appendChild(el('p', {class: 'meta', text: 'Our rows beside the published ones (shaded, italic; experiments/anchors.csv). ' +
      'mean \u00b1 std over calibration seeds, then [low, high]: the ' + Math.round(100 * D.level) + '% bootstrap interval over the windows / documents (records with per-sample values).'}));
    D.tables.forEach(function (t) { s.appendChild(el('div', {class: 'paper-table', id: 'table-' + t.name, html: t.html})); });
  }
  function drawBench() {
    var s = sections.bench;
    s.appendChild(el('h2', {text: 'Benchmark ratios'}));
    if (!D.benchmarks.length) { s.appendChild(el('p', {class: 'meta', text: 'No benchmarks.json beside the store (pruning-lab bench writes it; --results DIR points at it).'})); }
    else {
      var tb = el('tbody');
      D.benchmarks.forEach(function (b) {
        tb.appendChild(el('tr', {}, [el('td', {class: 't', text: b.benchmark}), el('td', {class: 't w', text: b.compared}),
          el('td', {text: fmt(b.ratio, 3) + 'x'}), el('td', {class: 't', text: b.target || ''}),
          el('td', {class: b.pass ? 'ok' : 'fail', text: b.pass ? 'pass' : 'FAIL'}), el('td', {class: 't', text: b.detail || ''}), el('td', {class: 't', text: b.date || ''})]));
      });
      s.appendChild(el('div', {class: 'scroll'}, [el('table', {id: 'bench-table'}, [el('thead', {}, [el('tr', {}, ['benchmark', 'what is compared', 'ratio', 'target', 'pass', 'detail', 'date'].map(function (h) { return el('th', {text: h}); }))]), tb])]));
    }
    s.appendChild(el('h2', {text: 'AdaPruner studies'}));
    if (!D.studies.length) { s.appendChild(el('p', {class: 'meta', text: 'No AdaPruner study in this store.'})); }
    D.studies.forEach(function (st, i) {
      var div = el('div', {class: 'plot', id: 'study-' + i});
      s.appendChild(div);
      var ok = st.trials.filter(function (t) { return t.state === 'COMPLETE'; });
      var bad = st.trials.filter(function (t) { return t.state !== 'COMPLETE'; });
      Plotly.react(div, [
        {type: 'scatter', mode: 'markers', name: 'trial objective', x: ok.map(function (t) { return t.trial; }), y: ok.map(function (t) { return t.objective; })},
        {type: 'scatter', mode: 'lines', name: 'best so far', line: {shape: 'hv', color: '#d62728'}, x: ok.map(function (t) { return t.trial; }), y: ok.map(function (t) { return t.best_so_far; })},
        {type: 'scatter', mode: 'markers', name: 'infeasible / failed', marker: {symbol: 'x', color: '#999'}, x: bad.map(function (t) { return t.trial; }),
          y: bad.map(function () { return ok.length ? Math.max.apply(null, ok.map(function (t) { return t.objective; })) : 0; }),
          text: bad.map(function (t) { return t.state; }), hovertemplate: 'trial %{x}: %{text}<extra></extra>'}
      ], {title: {text: 'AdaPruner study ' + st.name + ' (' + ok.length + ' evaluated of ' + st.trials.length + ')', font: {size: 14}},
        xaxis: {title: {text: 'trial'}}, yaxis: {title: {text: 'PPL ' + (st.objective || '')}}}, {displaylogo: false, responsive: true});
    });
  }
  function drawSweep() {
    var s = sections.sweep;
    var counts = {};
    D.records.forEach(function (r) { counts[r.model] = (counts[r.model] || 0) + 1; });
    s.appendChild(el('p', {class: 'meta', text: 'In the store (done): ' + Object.keys(counts).sort().map(function (m) { return m + ' ' + counts[m]; }).join(', ') + '.'}));
    if (!D.sweep.length) {
      s.appendChild(el('p', {class: 'meta', text: 'No sweep directory given: pruning-lab dashboard --sweep runs/multirun/<date>/<time> shows each job as done, running, failed (with the reason), pending or stopped.'}));
      return;
    }
    var by = {};
    D.sweep.forEach(function (j) { by[j.state] = (by[j.state] || 0) + 1; });
    s.appendChild(el('p', {id: 'sweep-summary', text: Object.keys(by).sort().map(function (k) { return k + ': ' + by[k]; }).join(' \u00b7 ')}));
    var shown = {};
    D.sweep.forEach(function (j) {
      if (j.shared && !shown[j.sweep]) { shown[j.sweep] = 1; s.appendChild(el('p', {class: 'meta', text: j.sweep + ': every job sets ' + j.shared})); }
    });
    var tb = el('tbody');
    D.sweep.forEach(function (j) {
      tb.appendChild(el('tr', {}, [el('td', {class: 't', text: j.sweep}), el('td', {text: String(j.job)}), el('td', {class: 't', text: j.overrides}),
        el('td', {class: 't state-' + j.state, text: j.state}), el('td', {class: 't', text: j.reason})]));
    });
    s.appendChild(el('div', {class: 'scroll'}, [el('table', {id: 'sweep-table'}, [el('thead', {}, [el('tr', {}, ['sweep', 'job', 'overrides (what differs)', 'state', 'record / reason'].map(function (h) { return el('th', {text: h}); }))]), tb])]));
  }

  var DRAW = {explorer: drawExplorer, quality: drawQuality, widths: drawWidths, tables: drawTables, bench: drawBench, sweep: drawSweep};
  show(DRAW[state.tab] ? state.tab : 'explorer');
  document.body.dataset.ready = '1';

  // ------------------------------------------------------------------ served: reload when the store changes
  if (location.protocol === 'http:' || location.protocol === 'https:') {
    setInterval(function () {
      fetch('version.json', {cache: 'no-store'}).then(function (r) { return r.json(); }).then(function (v) {
        if (D.version && v.version !== D.version) { save(); location.reload(); }
      }).catch(function () { /* the server stopped: keep the page */ });
    }, 1000);
  }
})();
