// What both dashboards share (the cloudlet's /ui and the directory's):
// loaded before each page's own script.
'use strict';

const $ = (sel, el = document) => el.querySelector(sel);
const esc = s => String(s ?? '').replace(/[&<>"']/g, c => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' }[c]));
const sleep = ms => new Promise(r => setTimeout(r, ms));

// The credential: from the page's fragment (#token=..., never sent to a
// server; taken out of the address bar), else the one given in this tab
// before.
function takeToken() {
  const m = location.hash.match(/token=([^&]+)/);
  if (m) {
    sessionStorage.setItem('cloudlet-token', decodeURIComponent(m[1]));
    history.replaceState(null, '', location.pathname);
  }
  return sessionStorage.getItem('cloudlet-token');
}

function authHeaders(token) {
  return token ? { Authorization: 'Bearer ' + token } : {};
}

// The login form: keep the token given, hide the form, then `then(token)`.
function onLogin(then) {
  $('#login').addEventListener('submit', ev => {
    ev.preventDefault();
    const token = $('#token').value;
    sessionStorage.setItem('cloudlet-token', token);
    $('#login').hidden = true;
    then(token);
  });
}
