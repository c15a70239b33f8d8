"""The report page's static parts: its inline stylesheet and the few lines of vanilla JS behind the
gallery filters (cxrkit.inference.report inlines both; the page loads nothing from the network)."""

CSS = """
*{box-sizing:border-box}
body{margin:0;font:13px/1.35 system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;
  color:#1d2127;background:#f4f5f7}
header{background:#1f2630;color:#eef1f5;padding:8px 16px 7px}
h1{font-size:17px;margin:0 0 3px;font-weight:600}
h1 small{font-weight:400;color:#aeb8c4;font-size:13px;margin-left:8px}
h2{font-size:13px;margin:0 0 6px;text-transform:uppercase;letter-spacing:.04em;color:#56606c}
.meta{display:flex;flex-wrap:wrap;gap:2px 18px;margin:0;color:#cfd6de}
.meta b{color:#8d99a6;font-weight:400;margin-right:4px}
.warn{color:#ffcf70}
main{padding:10px 16px 24px}
.row{display:flex;flex-wrap:wrap;gap:12px;align-items:flex-start;margin-bottom:12px}
.panel{background:#fff;border:1px solid #dde1e6;border-radius:6px;padding:9px 11px}
.cards{display:flex;flex-direction:column;gap:8px}
.card{background:#fff;border:1px solid #dde1e6;border-radius:6px;padding:7px 12px;min-width:215px}
.card .lbl{color:#56606c;font-size:12px}
.card .big{font-size:24px;font-weight:650}
.card .ci,.card .n{color:#56606c;font-size:12px}
table{border-collapse:collapse}
th,td{padding:3px 7px;text-align:right;font-variant-numeric:tabular-nums}
th{color:#56606c;font-weight:500}
td.l,th.l{text-align:left}
.pc td,.pc th{border-bottom:1px solid #eceef1}
.cm td{min-width:64px;height:30px;text-align:center;border:1px solid #fff;font-weight:600}
.cm th.ax{color:#8d99a6;font-weight:400;font-size:11px}
.cm .rl{text-align:right;max-width:130px}
.cm .cl{width:64px;max-width:80px;font-size:11px;text-align:center;vertical-align:bottom}
.filters{display:flex;flex-wrap:wrap;gap:6px 14px;align-items:center;margin:0 0 8px}
.filters select{font:inherit;padding:1px 3px}
.note{color:#56606c;margin:0 0 8px}
.grid{display:flex;flex-wrap:wrap;gap:8px}
.wd{width:250px;background:#fff;border:1px solid #dde1e6;border-radius:5px;padding:4px;font-size:12px}
.wd img{display:block;width:240px;height:240px;object-fit:contain;background:#111}
figure.g{margin:0;width:170px;background:#fff;border:1px solid #dde1e6;border-radius:5px;padding:4px;overflow:hidden}
figure.g[hidden]{display:none}
figure.g.err{border:2px solid #d0342c;padding:3px}
figure.g img{display:block;width:160px;height:160px;object-fit:contain;background:#111;margin:0 auto}
figure.g .ph{display:flex;width:160px;height:160px;background:#333;color:#ccc;align-items:center;
  justify-content:center;margin:0 auto}
figcaption{margin-top:3px;font-size:12px}
figcaption div{white-space:nowrap;overflow:hidden;text-overflow:ellipsis}
figcaption .p{font-weight:650}
figcaption .bad{color:#c0271f;font-weight:650}
figcaption .ok{color:#2e7d32}
figcaption .fn{color:#7a838e;font-size:11px}
.bar{height:3px;background:#e3e6ea;margin:2px 0}
.bar i{display:block;height:3px;background:#ff9f1a}
.flag{display:inline-block;background:#fff2cc;color:#7a5200;border-radius:3px;padding:0 4px;font-size:11px;
  margin-right:3px}
.sk td,.sk th{text-align:left;border-bottom:1px solid #eceef1;vertical-align:top}
.sk td{word-break:break-all}
footer{color:#7a838e;padding:0 16px 20px}
a{color:#1a5fb4}
"""

JS = """
(function () {
  var P = document.getElementById("f-pred"), T = document.getElementById("f-true"),
      E = document.getElementById("f-err"), C = document.getElementById("f-count");
  var items = document.querySelectorAll("#grid figure");
  function apply() {
    var p = P ? P.value : "", t = T ? T.value : "", e = E ? E.checked : false, n = 0;
    for (var i = 0; i < items.length; i++) {
      var d = items[i].dataset;
      var ok = (!p || d.pred === p) && (!t || d["true"] === t) && (!e || d.err === "1");
      items[i].hidden = !ok;
      if (ok) { n++; }
    }
    if (C) { C.textContent = n + " of " + items.length + " shown"; }
  }
  [P, T, E].forEach(function (el) { if (el) { el.addEventListener("change", apply); } });
  apply();
  document.body.setAttribute("data-ready", "1");
})();
"""
