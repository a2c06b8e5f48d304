/**
 * users-table.js: the users table, drawn from the page's live view (realtime.js `LiveView`), with inline editing,
 * conflicts and delete. `render` takes one step of the view (its snapshot, or whole transactions) and draws it
 * in one go, so the table never shows half of a transaction; REST answers to the page's own saves are drawn at
 * once too, and the stream's frame for the same version follows.
 *
 * Rows are sorted newest id first and at most MAX_ROWS are in the DOM; the rest are counted (the filter is the
 * way to see them). `data-renders` on the table body counts the view's steps drawn, for tests.
 */
import { $, afterAnimation, formatUpdated, h, parseTime, setError } from './dom.js';
import { describe, fieldErrors, request } from './rest.js';

// Past a few hundred rows the table stops being readable; the filter is the way to see the rest.
const MAX_ROWS = 500;

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
/**
 * @type {Map<number, User>} every row of the current view, displayed or beyond MAX_ROWS: the live view's rows by
 * id, except that a REST answer to this page's own save is taken at once (its frame follows with the same version)
 */
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


// ── what the live view drives ────────────────────────────────────────────────────────────────────────────

/**
 * Draw one step of the live view: its snapshot, or whole transactions. Everything happens in this one call, so
 * the browser never paints a state between two changes of a transaction.
 * @param {import('./realtime.js').ViewUpdate} update
 */
export function render(update) {
  if (update.cause === 'snapshot' || update.changes.some((change) => change.view === 'reset')) {
    // A TRUNCATE in the step empties the view, and whatever followed it is in the rows: draw those.
    replaceAll(/** @type {User[]} */ ([...update.rows.values()]));
  } else {
    for (const change of update.changes) {
      // The view's rules (docs/protocol.md): removed deletes the key (a DELETE, or an update that took the row out
      // of the filter or out of what this token may read); added and modified upsert the row, under its new key
      // when the update changed the primary key.
      if (change.movedFrom != null) removeUser(Number(JSON.parse(change.movedFrom).id));
      if (change.view === 'removed') removeUser(Number(change.frame.key?.id));
      else upsert(/** @type {User} */ (change.row), change.view === 'added' ? 'insert' : 'update');
    }
  }
  tbody.dataset.renders = String((Number(tbody.dataset.renders) || 0) + 1);
}

/** Empty the table for a new subscription (another filter): it shows `loading…` until the view's snapshot. */
export function clearTable() {
  for (const id of [...views.keys()]) dropView(id, false);
  tbody.replaceChildren();
  users.clear();
  snapshotLoaded = false;
  updateMeta();
}

/** The server refused the table's subscription: say so where the count goes. */
export function showNotSubscribed() {
  snapshotLoaded = true;
  updateMeta();
  $('user-count').textContent = 'not subscribed';
}
