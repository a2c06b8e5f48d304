/**
 * rest.js: the demo page's calls to the REST API, and the bearer token they carry (the same one the stream uses;
 * signin.js sets it). Every write the page makes goes through here; its result reaches the table only through the
 * change stream.
 */

/**
 * @typedef {object} Problem  an application/problem+json body
 * @property {string} [title]
 * @property {string} [detail]
 * @property {number} [status]
 * @property {{field: string, message: string}[]} [errors]
 */

/** @type {string | null} the page's bearer token; null: none, as against an open server */
let bearer = null;

/** @returns {string | null} the token the page holds, if any */
export const currentToken = () => bearer;

/**
 * Hold `value` as the page's token from now on: REST calls send it, and so does the client's next `getToken`.
 * @param {string | null} value
 */
export function holdToken(value) {
  bearer = value;
}

/**
 * Call the REST API. Never throws: a network failure comes back as status 0 with a problem.
 * @param {string} method
 * @param {string} path
 * @param {{body?: object, version?: number}} [options]  `version` is sent as If-Match
 * @returns {Promise<{ok: true, status: number, data: any} | {ok: false, status: number, problem: Problem}>}
 */
export async function request(method, path, { body, version } = {}) {
  /** @type {Record<string, string>} */
  const headers = { Accept: 'application/json, application/problem+json' };
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  if (version !== undefined) headers['If-Match'] = `"${version}"`;
  if (bearer) headers.Authorization = `Bearer ${bearer}`;
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
export const describe = (problem) => problem.detail || problem.title || 'Something went wrong.';

/**
 * Split a 422's `errors` into messages per body field and the rest.
 * @param {Problem} problem
 * @param {string[]} fields
 */
export function fieldErrors(problem, fields) {
  /** @type {Record<string, string>} */
  const byField = {};
  const other = [];
  for (const error of problem.errors ?? []) {
    if (fields.includes(error.field)) byField[error.field] = byField[error.field] ? `${byField[error.field]} ${error.message}` : error.message;
    else other.push(error.message);
  }
  return { byField, other };
}
