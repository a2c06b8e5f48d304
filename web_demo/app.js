/**
 * app.js: the demo page. One snapshot subscription on `users` feeds the table; every write goes through the
 * REST API and shows up here only because the change stream delivers it, in this tab and in every other.
 *
 * Against a server with a token key, give the page a bearer token in the URL fragment, `/#token=<JWT>` (never
 * the query string, which servers and proxies log), or paste one into the form the page shows when the server
 * refuses it. The page takes the token out of the address bar at once, streams with it and sends it on every
 * REST request. Without one the page works as against an open server.
 *
 * The same panel offers "Sign in as" a user id and role: the page asks `POST /auth/dev-token` for a token (a
 * server signs them only with AUTH_DEV_TOKENS on; otherwise the route does not exist and the page says how to
 * mint one with `realtime token`). The server's refusal of a token-less page is the one signal that tokens are
 * on: the client's status becomes `unauthorized`, which shows the panel. Under a row-level policy the rows and
 * columns the page shows are the ones the server sends for its token; a withheld column shows as a dash.
 *
 * Hooks for browser tests (values of `data-testid`):
 *   status                 connection state; text is exactly `connecting`, `live`, `reconnecting`, `offline` or
 *                          `unauthorized` (the server refused the token, or there is none; the token form shows)
 *   token-form             the token form, shown only while the status is `unauthorized`, with token-input,
 *                          token-submit and token-message (why the server refused)
 *   signin-form            "Sign in as", beside the token form: signin-sub (user id), signin-role (member|admin),
 *                          signin-submit, and signin-message (why no token came, e.g. how to mint one instead)
 *   identity               who the server says the token is (`<sub> · <role>`), shown once it accepted one,
 *                          with sign-out (reloads the page without the token)
 *   seq                    last seq received by the table's subscription; `—` before the first
 *   subscription           state of the table's subscription; text is exactly `pending`, `live`, `retrying`
 *                          (the server answered `unavailable`; asked again after a delay) or `failed`
 *   create-form            the "Add a user" form, with fields create-name, create-email and button create-submit
 *   error-name, error-email, error-form   inline errors of that form; empty text when there is none
 *   create-status          confirmation after a successful create
 *   users-body             the table body
 *   user-row               one per displayed user; `data-id` = user id, `data-flash` = insert|update while tinted
 *   user-row-removed       a deleted row during its fade-out (it is removed from the DOM right after)
 *   user-id, user-name, user-email, user-version, user-updated-at   the cells of a row; a cell of a column the
 *                          server withheld (a row-level policy) has `data-withheld` and the text `—`
 *   edit, delete           per-row buttons while the row is read-only
 *   edit-name, edit-email, save, cancel    per-row inputs and buttons while the row is being edited
 *   row-error-name, row-error-email        field errors of a row being edited
 *   row-message            per-row outcome or conflict text (409, 412, 404, ...)
 *   reload                 "Reload row" button offered in row-message after a conflict
 *   user-count             number of users in the current view
 *   filter-form, filter-column, filter-op, filter-value, filter-apply, filter-clear   the row filter
 *   filter-error           why a filter could not be applied; filter-active: the filter in force, in words
 *   burst, burst-status    the traffic generator and its progress / outcome
 *   event-log              the live event list, newest first, at most 200 entries
 *   event-log-entry        one entry: `data-kind` = change|info|warn|error; changes also carry
 *                          `data-op`, `data-seq`, `data-id` and `data-latency` (ms)
 *   log-clear              empties the event log
 */
import { RealtimeClient } from './realtime.js';

const TABLE = 'users';
// Past a few hundred rows the table stops being readable; the filter is the way to see the rest.
const MAX_ROWS = 500;
const LOG_LIMIT = 200;
const BURST_SIZE = 20;
const BURST_CONCURRENCY = 4;

const $ = (/** @type {string} */ id) => /** @type {HTMLElement} */ (document.getElementById(id));

/**
 * The bearer token from `#token=...`, taken out of the address bar (and so out of bookmarks and screenshots)
 * before anything else runs. Null: none given, the page works as against an open server.
 * @returns {string | null}
 */
function takeTokenFromFragment() {
  const match = /^#(?:.*&)?token=([^&]*)/.exec(location.hash);
  if (!match) return null;
  history.replaceState(history.state, '', location.pathname + location.search);
  try {
    return decodeURIComponent(match[1]) || null;
  } catch {
    return match[1] || null;
  }
}

/** @type {string | null} */
let token = takeTokenFromFragment();

// ── DOM helpers ──────────────────────────────────────────────────────────────────────────────────────────

/**
 * Create an element. Text is only ever set through textContent or text nodes, so a name such as
 * `<img src=x onerror=alert(1)>` is displayed literally instead of becoming markup.
 * @param {string} tag
 * @param {Record<string, any>} [props]  `text`, `class`, `testid`, `on<event>`, anything else is an attribute
 * @param {...(Node | string | null | undefined)} children
 */
function h(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (value == null || value === false) continue;
    if (key === 'text') node.textContent = String(value);
    else if (key === 'class') node.className = value;
    else if (key === 'testid') node.dataset.testid = value;
    else if (key.startsWith('on')) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? '' : String(value));
  }
  for (const child of children) if (child != null) node.append(child);
  return node;
}

/**
 * Run `done` once the element's CSS animation ends, or soon anyway (reduced motion means no animationend).
 * @param {HTMLElement} node @param {() => void} done @param {number} [fallbackMs]
 */
function afterAnimation(node, done, fallbackMs = 2000) {
  let finished = false;
  const finish = () => {
    if (finished) return;
    finished = true;
    node.removeEventListener('animationend', finish);
    done();
  };
  node.addEventListener('animationend', finish);
  setTimeout(finish, fallbackMs);
}

/**
 * Parse an ISO timestamp keeping its microseconds as a fraction of a millisecond.
 * @param {unknown} value
 * @returns {number} epoch ms, NaN if unreadable
 */
function parseTime(value) {
  if (typeof value !== 'string') return NaN;
  const m = /^(\d{4}-\d\d-\d\d)[T ](\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:?\d\d)?$/i.exec(value);
  if (!m) return Date.parse(value);
  // The server speaks UTC; a missing offset is read as UTC, and "+0000" gets the colon Date.parse wants.
  const offset = !m[4] || m[4].toUpperCase() === 'Z' ? 'Z' : m[4].replace(/^([+-]\d\d)(\d\d)$/, '$1:$2');
  const whole = Date.parse(`${m[1]}T${m[2]}${offset}`);
  return whole + (m[3] ? Number(`0.${m[3]}`) * 1000 : 0);
}

const dateTimeFormat = new Intl.DateTimeFormat(undefined, { dateStyle: 'short', timeStyle: 'medium' });
// 24-hour clock: the log column is narrow and AM/PM adds nothing to "what just happened".
const clockFormat = new Intl.DateTimeFormat(undefined, { hour: '2-digit', minute: '2-digit', second: '2-digit', hourCycle: 'h23' });

/** Today's timestamps as a bare time, older ones with their date; the full value stays in the tooltip. */
function formatUpdated(/** @type {number} */ ms) {
  const sameDay = new Date(ms).toDateString() === new Date().toDateString();
  return sameDay ? clockFormat.format(ms) : dateTimeFormat.format(ms);
}

/** Wall-clock now with sub-millisecond precision, comparable with commit timestamps. */
const now = () => performance.timeOrigin + performance.now();

// ── REST ─────────────────────────────────────────────────────────────────────────────────────────────────

/**
 * @typedef {object} Problem  an application/problem+json body
 * @property {string} [title]
 * @property {string} [detail]
 * @property {number} [status]
 * @property {{field: string, message: string}[]} [errors]
 */

/**
 * Call the REST API. Never throws: a network failure comes back as status 0 with a problem.
 * @param {string} method
 * @param {string} path
 * @param {{body?: object, version?: number}} [options]  `version` is sent as If-Match
 * @returns {Promise<{ok: true, status: number, data: any} | {ok: false, status: number, problem: Problem}>}
 */
async function request(method, path, { body, version } = {}) {
  /** @type {Record<string, string>} */
  const headers = { Accept: 'application/json, application/problem+json' };
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  if (version !== undefined) headers['If-Match'] = `"${version}"`;
  if (token) headers.Authorization = `Bearer ${token}`;
  let response;
  try {
    response = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  } catch {
    return { ok: false, status: 0, problem: { title: 'Network error', detail: 'Could not reach the server.' } };
  }
  const text = await response.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    // A proxy error page is not JSON; its status still tells the story.
  }
  if (response.ok) return { ok: true, status: response.status, data };
  const problem = data && typeof data === 'object' ? data : { title: response.statusText || `HTTP ${response.status}` };
  return { ok: false, status: response.status, problem };
}

/** @param {Problem} problem */
const describe = (problem) => problem.detail || problem.title || 'Something went wrong.';

/**
 * Split a 422's `errors` into messages per body field and the rest.
 * @param {Problem} problem
 * @param {string[]} fields
 */
function fieldErrors(problem, fields) {
  /** @type {Record<string, string>} */
  const byField = {};
  const other = [];
  for (const error of problem.errors ?? []) {
    if (fields.includes(error.field)) byField[error.field] = byField[error.field] ? `${byField[error.field]} ${error.message}` : error.message;
    else other.push(error.message);
  }
  return { byField, other };
}

/**
 * Show or clear an inline error and keep the input's aria-invalid in step.
 * @param {HTMLElement} target
 * @param {HTMLInputElement | null} input
 * @param {string} [message]
 */
function setError(target, input, message = '') {
  target.textContent = message;
  if (input) {
    if (message) input.setAttribute('aria-invalid', 'true');
    else input.removeAttribute('aria-invalid');
  }
}

// ── users table ──────────────────────────────────────────────────────────────────────────────────────────

/**
 * @typedef {object} User
 * @property {number} id
 * @property {string} name
 * @property {string} email
 * @property {number} version
 * @property {string} created_at
 * @property {string} updated_at
 */

/**
 * The DOM of one displayed row.
 * @typedef {object} RowView
 * @property {HTMLTableRowElement} tr
 * @property {{id: HTMLElement, name: HTMLElement, email: HTMLElement, version: HTMLElement, updated: HTMLElement}} cells
 * @property {HTMLElement} buttons
 * @property {HTMLElement} message
 * @property {User} user
 * @property {null | RowEdit} edit
 */

/**
 * An open inline editor. `version`, `originalName` and `originalEmail` are the row as it was when editing began:
 * the save is conditional on that version and sends only the fields the user changed from it. `email` is null
 * when the server withholds the column from this token: there is nothing to edit it from.
 * @typedef {object} RowEdit
 * @property {number} version
 * @property {string} originalName
 * @property {string} originalEmail
 * @property {HTMLInputElement} name
 * @property {HTMLInputElement | null} email
 * @property {HTMLElement} nameError
 * @property {HTMLElement | null} emailError
 * @property {HTMLButtonElement} save
 * @property {boolean} saving
 */

const tbody = $('users-body');
/** @type {Map<number, User>} every row of the current view, displayed or beyond MAX_ROWS */
const users = new Map();
/** @type {Map<number, RowView>} rows in the DOM, newest id first */
const views = new Map();
let snapshotLoaded = false;

/** @param {RowView} view @param {User} user */
function fillCells(view, user) {
  view.user = user;
  view.tr.dataset.version = String(user.version);
  view.cells.id.textContent = String(user.id);
  if (!view.edit) {
    showValue(view.cells.name, user.name);
    showValue(view.cells.email, user.email);
  }
  view.cells.version.textContent = String(user.version);
  const updated = parseTime(user.updated_at);
  const time = h('time', {
    datetime: user.updated_at,
    title: user.updated_at,
    text: Number.isNaN(updated) ? user.updated_at : formatUpdated(updated),
  });
  view.cells.updated.replaceChildren(time);
}

/**
 * Put a text column's value in its cell. A row-level policy may leave the column out of the rows this token
 * gets: the cell then says so with a dash, rather than "undefined" or an empty cell that looks like data.
 * @param {HTMLElement} cell @param {string | undefined} value
 */
function showValue(cell, value) {
  if (value === undefined) {
    cell.textContent = '—';
    cell.dataset.withheld = '';
    cell.title = 'not sent to this token';
  } else {
    cell.textContent = value;
    delete cell.dataset.withheld;
    cell.removeAttribute('title');
  }
}

/** @param {User} user @returns {RowView} */
function createView(user) {
  const cells = {
    // data-label names the column when narrow screens turn each row into a card.
    id: h('td', { testid: 'user-id', class: 'num', 'data-label': 'id' }),
    name: h('td', { testid: 'user-name', class: 'cell-name', 'data-label': 'name' }),
    email: h('td', { testid: 'user-email', class: 'cell-email', 'data-label': 'email' }),
    version: h('td', { testid: 'user-version', class: 'num', 'data-label': 'version' }),
    updated: h('td', { testid: 'user-updated-at', class: 'cell-time', 'data-label': 'updated_at' }),
  };
  const buttons = h('div', { class: 'row-buttons' });
  const message = h('div', { class: 'row-message', testid: 'row-message', 'aria-live': 'polite' });
  const tr = /** @type {HTMLTableRowElement} */ (
    h('tr', { testid: 'user-row', 'data-id': user.id },
      cells.id, cells.name, cells.email, cells.version, cells.updated,
      h('td', { class: 'cell-actions' }, buttons, message))
  );
  /** @type {RowView} */
  const view = { tr, cells, buttons, message, user, edit: null };
  fillCells(view, user);
  showReadButtons(view);
  views.set(user.id, view);
  return view;
}

/** @param {RowView} view */
function showReadButtons(view) {
  const id = view.user.id;
  view.buttons.replaceChildren(
    h('button', { type: 'button', class: 'btn btn-small', testid: 'edit', 'aria-label': `Edit user ${id}`,
      text: 'Edit', onclick: () => startEdit(view) }),
    h('button', { type: 'button', class: 'btn btn-small btn-danger', testid: 'delete',
      'aria-label': `Delete user ${id}`, text: 'Delete', onclick: () => deleteUser(view) }),
  );
}

/** The lowest id in the DOM: with rows sorted newest first, the one that yields its place to a newer one. */
function lowestShownId() {
  let lowest = Infinity;
  for (const id of views.keys()) if (id < lowest) lowest = id;
  return lowest;
}

/** @param {HTMLTableRowElement} tr @param {number} id */
function insertSorted(tr, id) {
  for (const other of tbody.children) {
    const row = /** @type {HTMLElement} */ (other);
    if (row.dataset.testid === 'user-row' && Number(row.dataset.id) < id) {
      tbody.insertBefore(tr, row);
      return;
    }
  }
  tbody.append(tr);
}

/**
 * Take a row out of the DOM, fading it when it was deleted.
 * @param {number} id
 * @param {boolean} fade
 */
function dropView(id, fade) {
  const view = views.get(id);
  if (!view) return;
  views.delete(id);
  view.edit = null;
  const tr = view.tr;
  // Keyboard users would otherwise be left on a node that no longer exists.
  if (tr.contains(document.activeElement)) $('users-heading').focus();
  if (!fade) {
    tr.remove();
    return;
  }
  tr.dataset.testid = 'user-row-removed';
  tr.inert = true;
  tr.classList.add('leaving');
  afterAnimation(tr, () => tr.remove(), 1200);
}

/** Replace the view with a complete snapshot, keeping rows (and any edit in progress) that survive it. */
function replaceAll(/** @type {User[]} */ rows) {
  users.clear();
  for (const row of rows) users.set(row.id, row);
  const shown = [...users.keys()].sort((a, b) => b - a).slice(0, MAX_ROWS);
  const keep = new Set(shown);
  for (const id of [...views.keys()]) if (!keep.has(id)) dropView(id, false);
  for (const tr of tbody.querySelectorAll('tr.leaving')) tr.remove();
  let cursor = tbody.firstElementChild;
  for (const id of shown) {
    const user = /** @type {User} */ (users.get(id));
    const view = views.get(id) ?? createView(user);
    fillCells(view, user);
    if (view.tr === cursor) cursor = cursor.nextElementSibling;
    else tbody.insertBefore(view.tr, cursor);
  }
  snapshotLoaded = true;
  updateMeta();
}

/**
 * Apply an inserted or updated row and tint it.
 * @param {User} user
 * @param {'insert' | 'update'} kind
 */
function upsert(user, kind) {
  const known = users.get(user.id);
  // REST responses are applied too; never let a late, older copy overwrite a newer one.
  if (known && known.version > user.version) return;
  users.set(user.id, user);
  let view = views.get(user.id);
  if (view) {
    fillCells(view, user);
    // While our own save is in flight its frame often beats the HTTP response; that is not someone else.
    if (view.edit && !view.edit.saving && user.version !== view.edit.version) warnStale(view);
  } else {
    if (views.size >= MAX_ROWS && user.id < lowestShownId()) {
      updateMeta();
      return; // beyond the display cap; counted, not shown
    }
    view = createView(user);
    insertSorted(view.tr, user.id);
    if (views.size > MAX_ROWS) dropView(lowestShownId(), false);
  }
  flash(view.tr, kind);
  updateMeta();
}

/** @param {number} id */
function removeUser(id) {
  users.delete(id);
  if (views.has(id)) {
    dropView(id, true);
    // A row beyond the display cap moves up into the freed place.
    if (users.size > views.size) {
      let next = -Infinity;
      for (const other of users.keys()) if (!views.has(other) && other > next) next = other;
      const view = createView(/** @type {User} */ (users.get(next)));
      insertSorted(view.tr, next);
    }
  }
  updateMeta();
}

/** Restart the tint animation even when the row changed a moment ago and is still tinted. */
function flash(/** @type {HTMLElement} */ tr, /** @type {'insert' | 'update'} */ kind) {
  tr.classList.remove('flash-insert', 'flash-update');
  void tr.offsetWidth; // force a style flush so re-adding the class starts the animation over
  tr.classList.add(`flash-${kind}`);
  tr.dataset.flash = kind;
  const token = (Number(tr.dataset.flashToken) || 0) + 1;
  tr.dataset.flashToken = String(token);
  afterAnimation(tr, () => {
    if (tr.dataset.flashToken !== String(token)) return; // a newer flash owns the row now
    tr.classList.remove(`flash-${kind}`);
    delete tr.dataset.flash;
  }, 2500);
}

function updateMeta() {
  const count = users.size;
  $('user-count').textContent = snapshotLoaded ? `${count} ${count === 1 ? 'user' : 'users'}` : 'loading…';
  $('users-empty').hidden = !snapshotLoaded || count > 0;
  const capped = $('users-capped');
  capped.hidden = count <= views.size;
  capped.textContent = `Showing the newest ${views.size} of ${count} users. Use the filter to find the others.`;
}

// ── row editing, conflicts, delete ───────────────────────────────────────────────────────────────────────

/**
 * One labelled input for inline editing; the label is visually hidden because the column header says it.
 * @param {RowView} view @param {'name' | 'email'} field
 */
function editField(view, field) {
  const id = view.user.id;
  const inputId = `row-${id}-${field}`;
  const errorId = `row-${id}-${field}-error`;
  const input = /** @type {HTMLInputElement} */ (h('input', {
    id: inputId, name: field, type: field === 'email' ? 'email' : 'text', autocomplete: 'off',
    form: `row-${id}-form`, testid: `edit-${field}`, 'aria-describedby': errorId,
    maxlength: field === 'name' ? 200 : null,
  }));
  input.value = view.user[field];
  input.addEventListener('keydown', (event) => {
    if (event.key === 'Escape') stopEdit(view, true);
  });
  const error = h('p', { id: errorId, class: 'field-error', testid: `row-error-${field}` });
  const label = h('label', { for: inputId, class: 'visually-hidden', text: `${field} of user ${id}` });
  view.cells[field].replaceChildren(label, input, error);
  return { input, error };
}

/** @param {RowView} view */
function startEdit(view) {
  const id = view.user.id;
  const name = editField(view, 'name');
  const email = view.user.email === undefined ? null : editField(view, 'email');
  const save = /** @type {HTMLButtonElement} */ (h('button', { type: 'submit', class: 'btn btn-small btn-primary',
    testid: 'save', 'aria-label': `Save user ${id}`, text: 'Save' }));
  const form = h('form', { id: `row-${id}-form`, class: 'row-form', novalidate: true },
    save,
    h('button', { type: 'button', class: 'btn btn-small btn-quiet', testid: 'cancel',
      'aria-label': `Cancel editing user ${id}`, text: 'Cancel', onclick: () => stopEdit(view, true) }));
  form.addEventListener('submit', (event) => {
    event.preventDefault();
    saveEdit(view);
  });
  view.edit = { version: view.user.version, originalName: view.user.name, originalEmail: view.user.email,
    name: name.input, email: email?.input ?? null, nameError: name.error, emailError: email?.error ?? null, save,
    saving: false };
  view.buttons.replaceChildren(form);
  view.message.replaceChildren();
  view.tr.classList.add('editing');
  name.input.focus();
}

/** @param {RowView} view @param {boolean} restoreFocus */
function stopEdit(view, restoreFocus) {
  view.edit = null;
  view.tr.classList.remove('editing');
  view.message.replaceChildren();
  fillCells(view, view.user);
  showReadButtons(view);
  if (restoreFocus) /** @type {HTMLElement} */ (view.buttons.querySelector('[data-testid="edit"]')).focus();
}

/**
 * Put a message in the row, optionally with a button that fetches the row again.
 * @param {RowView} view
 * @param {string} text
 * @param {{reload?: boolean, tone?: 'info' | 'error'}} [options]
 */
function rowMessage(view, text, { reload = false, tone = 'error' } = {}) {
  view.message.dataset.tone = tone;
  view.message.replaceChildren(h('span', { text }));
  if (reload) {
    view.message.append(' ', h('button', { type: 'button', class: 'btn btn-small btn-link', testid: 'reload',
      text: 'Reload row', onclick: () => reloadRow(view) }));
  }
}

/** Someone else committed a change to a row while it is open in the editor; say so before Save is refused. */
function warnStale(/** @type {RowView} */ view) {
  rowMessage(view, 'Someone else just changed this user; saving would be refused.', { reload: true });
}

/** @param {RowView} view */
async function saveEdit(view) {
  const edit = view.edit;
  if (!edit) return;
  setError(edit.nameError, edit.name);
  if (edit.emailError) setError(edit.emailError, edit.email);
  view.message.replaceChildren();
  /** @type {{name?: string, email?: string}} */
  const body = {};
  if (edit.name.value !== edit.originalName) body.name = edit.name.value;
  const email = edit.email?.value.trim();
  if (email !== undefined && email !== edit.originalEmail) body.email = email;
  if (Object.keys(body).length === 0) {
    stopEdit(view, true);
    return;
  }
  edit.saving = true;
  edit.save.setAttribute('aria-busy', 'true');
  const result = await request('PATCH', `/users/${view.user.id}`, { body, version: edit.version });
  edit.saving = false;
  edit.save.removeAttribute('aria-busy');
  if (view.edit !== edit) return; // the row was deleted or reloaded meanwhile
  if (result.ok) {
    stopEdit(view, true);
    upsertFromRest(result.data);
    return;
  }
  const { problem } = result;
  if (result.status === 422) {
    const { byField, other } = fieldErrors(problem, ['name', 'email']);
    setError(edit.nameError, edit.name, byField.name);
    if (edit.emailError) setError(edit.emailError, edit.email, byField.email);
    if (other.length) rowMessage(view, other.join(' '));
    (byField.name || !edit.email ? edit.name : edit.email).focus();
  } else if (result.status === 409 && edit.emailError) {
    setError(edit.emailError, edit.email, describe(problem));
    edit.email?.focus();
  } else if (result.status === 412) {
    rowMessage(view, 'Someone else changed this user after you started editing.', { reload: true });
  } else if (result.status === 404) {
    rowMessage(view, 'This user no longer exists.');
  } else {
    rowMessage(view, describe(problem));
  }
}

/**
 * Apply a row returned by REST at once, so the editor closes on the saved values; the stream frame for the
 * same version follows and only re-tints the row.
 * @param {User} user
 */
function upsertFromRest(user) {
  const known = users.get(user.id);
  if (!known || known.version >= user.version) return;
  const view = views.get(user.id);
  users.set(user.id, user);
  if (view) fillCells(view, user);
}

/** Fetch the latest copy of a row after a conflict; an open editor restarts from it. @param {RowView} view */
async function reloadRow(view) {
  const id = view.user.id;
  rowMessage(view, 'Reloading…', { tone: 'info' });
  const result = await request('GET', `/users/${id}`);
  if (views.get(id) !== view) return;
  if (result.status === 404) {
    rowMessage(view, 'This user was deleted in the meantime.');
    return;
  }
  if (!result.ok) {
    rowMessage(view, describe(result.problem), { reload: true });
    return;
  }
  /** @type {User} */
  const fresh = result.data;
  users.set(id, fresh);
  const wasEditing = Boolean(view.edit);
  view.edit = null;
  fillCells(view, fresh);
  if (wasEditing) {
    startEdit(view);
    rowMessage(view, `Loaded version ${fresh.version}. Make your change again and save.`, { tone: 'info' });
  } else {
    showReadButtons(view);
    rowMessage(view, `Loaded version ${fresh.version}.`, { tone: 'info' });
  }
}

/** @param {RowView} view */
async function deleteUser(view) {
  const { id, version } = view.user;
  rowMessage(view, 'Deleting…', { tone: 'info' });
  const result = await request('DELETE', `/users/${id}`, { version });
  if (views.get(id) !== view) return; // the stream already removed it
  if (result.ok) {
    // The row fades out when the DELETE arrives on the stream, which is the point of the demo.
    rowMessage(view, 'Deleted; waiting for the stream…', { tone: 'info' });
  } else if (result.status === 412) {
    rowMessage(view, 'Someone else changed this user; it was not deleted.', { reload: true });
  } else if (result.status === 404) {
    rowMessage(view, 'Already deleted.', { tone: 'info' });
  } else {
    rowMessage(view, describe(result.problem));
  }
}

// ── create form ──────────────────────────────────────────────────────────────────────────────────────────

function wireCreateForm() {
  const form = /** @type {HTMLFormElement} */ ($('create-form'));
  const name = /** @type {HTMLInputElement} */ ($('create-name'));
  const email = /** @type {HTMLInputElement} */ ($('create-email'));
  const submit = /** @type {HTMLButtonElement} */ (form.querySelector('[type="submit"]'));
  const errorName = $('error-name');
  const errorEmail = $('error-email');
  const errorForm = $('error-form');
  const status = $('create-status');
  let busy = false;

  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    if (busy) return;
    busy = true;
    submit.setAttribute('aria-busy', 'true');
    setError(errorName, name);
    setError(errorEmail, email);
    setError(errorForm, null);
    status.textContent = '';
    const result = await request('POST', '/users', { body: { name: name.value, email: email.value.trim() } });
    busy = false;
    submit.removeAttribute('aria-busy');
    if (result.ok) {
      status.textContent = `Added user ${result.data.id}. It reached the table through the stream.`;
      form.reset();
      name.focus();
      return;
    }
    const { problem } = result;
    if (result.status === 422) {
      const { byField, other } = fieldErrors(problem, ['name', 'email']);
      setError(errorName, name, byField.name);
      setError(errorEmail, email, byField.email);
      if (other.length || (!byField.name && !byField.email)) setError(errorForm, null, other.join(' ') || describe(problem));
      (byField.name ? name : byField.email ? email : submit).focus();
    } else if (result.status === 409) {
      setError(errorEmail, email, describe(problem));
      email.focus();
    } else {
      setError(errorForm, null, describe(problem));
    }
  });
}

// ── event log ────────────────────────────────────────────────────────────────────────────────────────────

const log = $('event-log');

/** @param {HTMLElement} entry */
function pushLog(entry) {
  log.prepend(entry);
  while (log.childElementCount > LOG_LIMIT) /** @type {Element} */ (log.lastElementChild).remove();
}

/**
 * @param {string} text
 * @param {'info' | 'warn' | 'error'} [kind]
 */
function logNote(text, kind = 'info') {
  pushLog(h('li', { class: `log-entry log-${kind}`, testid: 'event-log-entry', 'data-kind': kind },
    h('time', { class: 'log-time', text: clockFormat.format(Date.now()) }),
    h('span', { class: 'log-text', text })));
}

/** @param {import('./realtime.js').ChangeFrame} frame @param {number} arrivedAt */
function logChange(frame, arrivedAt) {
  const row = /** @type {Partial<User>} */ (frame.row ?? frame.old ?? frame.key ?? {});
  const latency = arrivedAt - parseTime(frame.ts);
  const latencyText = Number.isFinite(latency) ? `${Math.round(latency)} ms` : '—';
  pushLog(h('li', {
    class: `log-entry log-change op-${String(frame.op).toLowerCase()}`, testid: 'event-log-entry',
    'data-kind': 'change', 'data-op': frame.op, 'data-seq': frame.seq, 'data-id': row.id,
    'data-latency': Number.isFinite(latency) ? latency.toFixed(1) : null,
  },
  h('time', { class: 'log-time', text: clockFormat.format(arrivedAt) }),
  h('span', { class: 'log-op', text: frame.op }),
  h('span', { class: 'log-seq', text: `seq ${frame.seq}` }),
  h('span', { class: 'log-id', text: `id ${row.id}` }),
  h('span', { class: 'log-latency', title: 'arrival here minus commit time', text: latencyText }),
  h('span', { class: 'log-name', text: row.name ?? '' })));
}

// ── subscription and filter ──────────────────────────────────────────────────────────────────────────────

// With no token the client sends none, exactly as on an open server.
const rt = new RealtimeClient('/ws', token ? { getToken: () => token ?? '' } : {});
/** @type {import('./realtime.js').Subscription | null} */
let subscription = null;

/** @param {number | null} seq */
function showSeq(seq) {
  $('seq').textContent = seq == null ? '—' : String(seq);
}

/** Show the table subscription's state as the client reports it. */
function showSubscription() {
  const state = subscription?.state ?? 'pending';
  const node = $('subscription');
  node.textContent = state;
  node.dataset.state = state;
}

/**
 * (Re)subscribe the table, with a snapshot so the view starts complete.
 * @param {import('./realtime.js').Condition | null} filter
 */
function subscribeTable(filter) {
  subscription?.unsubscribe();
  for (const id of [...views.keys()]) dropView(id, false);
  tbody.replaceChildren();
  users.clear();
  snapshotLoaded = false;
  updateMeta();
  showSeq(null);
  $('filter-active').textContent = filter
    ? `where ${filter.column} ${filter.op} ${JSON.stringify(filter.value)}`
    : 'all rows';

  const sub = rt.subscribe({ table: TABLE, snapshot: true, filter: filter ? [filter] : undefined }, {
    snapshot(rows, seq) {
      replaceAll(/** @type {User[]} */ (rows));
      showSeq(seq);
      logNote(`Snapshot: ${rows.length} ${rows.length === 1 ? 'row' : 'rows'} at seq ${seq}.`);
    },
    subscribed(seq) {
      showSeq(sub.seq);
      showSubscription();
      logNote(`Subscribed; live after seq ${seq}.`);
    },
    change(frame) {
      const arrivedAt = now();
      // The view's two rules (docs/protocol.md): removed deletes the key (a DELETE, or an update that took the
      // row out of the filter or out of what this token may read); added and modified upsert the row. A TRUNCATE
      // resets the view to empty.
      if (frame.view === 'reset') replaceAll([]);
      else if (frame.view === 'removed') removeUser(/** @type {number} */ (frame.key?.id));
      else upsert(/** @type {User} */ (frame.row), frame.view === 'added' ? 'insert' : 'update');
      showSeq(frame.seq);
      logChange(frame, arrivedAt);
    },
    reset() {
      logNote('Our resume point expired on the server; reloading the table from a fresh snapshot.', 'warn');
    },
    retry(err, delay) {
      showSubscription();
      // The table keeps what it shows: the retry resumes from the page's position (or asks for the snapshot
      // again if none has arrived yet), so nothing is missed.
      logNote(`The server cannot serve the table right now (${err.message}); asking again in ${(delay / 1000).toFixed(1)} s.`, 'warn');
    },
    error(err) {
      showSubscription();
      snapshotLoaded = true;
      updateMeta();
      $('user-count').textContent = 'not subscribed';
      if (filter) setError($('filter-error'), /** @type {HTMLInputElement} */ ($('filter-value')), `The server refused this filter: ${err.message}`);
      logNote(`Subscription refused (${err.code}): ${err.message}`, 'error');
    },
  });
  subscription = sub;
  showSubscription();
}

function wireFilter() {
  const form = /** @type {HTMLFormElement} */ ($('filter-form'));
  const column = /** @type {HTMLSelectElement} */ ($('filter-column'));
  const op = /** @type {HTMLSelectElement} */ ($('filter-op'));
  const value = /** @type {HTMLInputElement} */ ($('filter-value'));
  const error = $('filter-error');

  // ids compare as numbers on the server, so only whole numbers make sense there.
  const syncInputMode = () => value.setAttribute('inputmode', column.value === 'id' ? 'numeric' : 'text');
  column.addEventListener('change', syncInputMode);
  syncInputMode();

  form.addEventListener('submit', (event) => {
    event.preventDefault();
    setError(error, value);
    const raw = value.value;
    if (raw.trim() === '') {
      setError(error, value, 'Enter a value to compare with.');
      value.focus();
      return;
    }
    let parsed = /** @type {string | number} */ (raw);
    if (column.value === 'id') {
      if (!/^\s*-?\d+\s*$/.test(raw)) {
        setError(error, value, 'id is a whole number.');
        value.focus();
        return;
      }
      parsed = Number(raw);
    }
    subscribeTable({ column: column.value, op: /** @type {any} */ (op.value), value: parsed });
    logNote(`Filter applied: ${column.value} ${op.value} ${JSON.stringify(parsed)}.`);
  });

  $('filter-clear').addEventListener('click', () => {
    form.reset();
    syncInputMode();
    setError(error, value);
    subscribeTable(null);
    logNote('Filter cleared.');
  });
}

// ── burst ────────────────────────────────────────────────────────────────────────────────────────────────

/**
 * Run `task` over `items` with at most `limit` in flight, keeping results in input order.
 * @template T, R
 * @param {T[]} items @param {number} limit @param {(item: T) => Promise<R>} task
 * @returns {Promise<R[]>}
 */
async function inPool(items, limit, task) {
  const results = new Array(items.length);
  let next = 0;
  const worker = async () => {
    while (next < items.length) {
      const index = next++;
      results[index] = await task(items[index]);
    }
  };
  await Promise.all(Array.from({ length: Math.min(limit, items.length) }, worker));
  return results;
}

function wireBurst() {
  const button = $('burst');
  const status = $('burst-status');
  let running = false;

  button.addEventListener('click', async () => {
    // aria-disabled rather than disabled: a disabled button drops keyboard focus to <body>.
    if (running) return;
    running = true;
    button.setAttribute('aria-disabled', 'true');
    const started = performance.now();
    const tag = Math.random().toString(36).slice(2, 7);
    let failed = 0;
    /** @param {string} verb @param {number} total */
    const progress = (verb, total) => {
      let done = 0;
      status.textContent = `${verb} 0/${total}…`;
      return () => { status.textContent = `${verb} ${++done}/${total}…`; };
    };
    /** Successful results' bodies; failures are only counted. @param {any} result @returns {any[]} */
    const keep = (result) => {
      if (result.ok) return [result.data];
      failed += 1;
      return [];
    };

    const indexes = Array.from({ length: BURST_SIZE }, (_, i) => i + 1);
    let tick = progress('Creating', indexes.length);
    const created = (await inPool(indexes, BURST_CONCURRENCY, async (i) => {
      const result = await request('POST', '/users', { body: { name: `Burst ${tag} ${i}`, email: `burst-${tag}-${i}@example.com` } });
      tick();
      return result;
    })).flatMap(keep);

    tick = progress('Updating', created.length);
    const updated = (await inPool(created, BURST_CONCURRENCY, async (user) => {
      const result = await request('PATCH', `/users/${user.id}`, { body: { name: `${user.name} (edited)` }, version: user.version });
      tick();
      return result;
    })).flatMap(keep);

    tick = progress('Deleting', updated.length);
    const deleted = (await inPool(updated, BURST_CONCURRENCY, async (user) => {
      const result = await request('DELETE', `/users/${user.id}`, { version: user.version });
      tick();
      return result;
    })).flatMap(keep);

    const seconds = ((performance.now() - started) / 1000).toFixed(1);
    status.textContent = `Done in ${seconds} s: ${created.length} created, ${updated.length} updated, `
      + `${deleted.length} deleted${failed ? `, ${failed} requests failed` : ''}.`;
    button.removeAttribute('aria-disabled');
    running = false;
  });
}

// ── start ────────────────────────────────────────────────────────────────────────────────────────────────

function wireConnection() {
  const status = $('status');
  const said = {
    connecting: 'Connecting…',
    live: 'Connected: changes stream live.',
    reconnecting: 'Connection lost; reconnecting…',
    offline: 'Offline. The stream resumes where it stopped once the network is back.',
    unauthorized: 'The server wants a valid token and stopped trying; enter one above.',
  };
  rt.on('status', (state) => {
    status.textContent = state;
    status.dataset.state = state;
    document.body.dataset.connection = state;
    $('token-panel').hidden = state !== 'unauthorized';
    if (state === 'unauthorized') $('identity-box').hidden = true; // the server no longer takes that identity
    showSubscription(); // a lost connection makes the subscription pending until it is sent again
    logNote(said[state], state === 'live' ? 'info' : state === 'unauthorized' ? 'error' : 'warn');
  });
  rt.on('disconnect', ({ code, reason }) => {
    logNote(`Socket closed (${code}${reason ? `: ${reason}` : ''}); the stream resumes from its last seq.`, 'warn');
  });
  rt.on('error', (err) => {
    if (err.code === 'unauthorized' || err.code === 'forbidden') $('token-message').textContent = err.message;
    logNote(`${err.code}: ${err.message}`, 'error');
  });
  rt.on('authenticated', ({ sub, role }) => {
    // An open server answers `auth` with no identity: there is nobody to show.
    $('identity-box').hidden = sub == null;
    $('identity').textContent = role ? `${sub} · ${role}` : String(sub);
  });
  // The token lives only in this tab's memory (the fragment was taken out of the address bar), so a reload
  // starts the page without one, ready to sign in as someone else.
  $('sign-out').addEventListener('click', () => location.reload());
}

/**
 * Start over with `value` as this page's token: a fresh page, so that a table read as someone else is never
 * shown to (or resumed for) the new identity. The fragment is taken straight out of the address bar again.
 * @param {string} value
 */
function startWithToken(value) {
  location.hash = `token=${encodeURIComponent(value)}`;
  location.reload();
}

function wireToken() {
  const form = /** @type {HTMLFormElement} */ ($('token-form'));
  const input = /** @type {HTMLInputElement} */ ($('token-input'));
  form.addEventListener('submit', (event) => {
    event.preventDefault();
    const value = input.value.trim();
    if (!value) {
      input.focus();
      return;
    }
    if (token) {
      // The client already asks us for tokens: the next attempt gets this one.
      token = value;
      form.reset();
      rt.connect();
      return;
    }
    // This page started without a token, so its client sends none.
    startWithToken(value);
  });
}

/** "Sign in as": a development token from the server when it signs them, else how to mint one. */
function wireSignIn() {
  const form = /** @type {HTMLFormElement} */ ($('signin-form'));
  const sub = /** @type {HTMLInputElement} */ ($('signin-sub'));
  const role = /** @type {HTMLSelectElement} */ ($('signin-role'));
  const submit = /** @type {HTMLButtonElement} */ (form.querySelector('[type="submit"]'));
  const message = $('signin-message');
  let busy = false;

  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    if (busy) return;
    setError(message, sub);
    const who = sub.value.trim();
    if (!who) {
      setError(message, sub, 'Enter the id of the user to sign in as.');
      sub.focus();
      return;
    }
    busy = true;
    submit.setAttribute('aria-busy', 'true');
    const result = await request('POST', '/auth/dev-token', { body: { sub: who, role: role.value } });
    busy = false;
    submit.removeAttribute('aria-busy');
    if (result.ok) {
      startWithToken(result.data.token);
      return;
    }
    if (result.status === 404 || result.status === 405) {
      // No such route: AUTH_DEV_TOKENS is off, as it is everywhere but a developer's machine.
      message.replaceChildren(
        'This server does not sign development tokens (AUTH_DEV_TOKENS is off). Where it runs, mint one with ',
        h('code', { text: `realtime token --sub ${who} --role ${role.value}` }),
        ' and paste it below.',
      );
      $('token-input').focus();
      return;
    }
    setError(message, result.status === 422 ? sub : null, describe(result.problem));
  });
}

wireConnection();
wireToken();
wireSignIn();
wireCreateForm();
wireFilter();
wireBurst();
$('log-clear').addEventListener('click', () => log.replaceChildren());
subscribeTable(null);
rt.connect();
