// Where the server is, as seen from this page. Every URL the pages build goes through here and
// is relative to the page's own location, so a page served under a `/t/{token}` prefix, or
// opened with `?token=` (PROTOCOL §8, access control), reaches the server the same way
// without any other file knowing about tokens.

const here = new URL(location.href);

/** A `?token=` the page was opened with, passed on to every request it makes. */
export const token = here.searchParams.get('token');

/** The path of the server's root for this page: `/`, or `/t/{token}/` behind a token prefix. */
export function rootPath() {
  const path = location.pathname;
  const view = path.lastIndexOf('/s/');
  if (view >= 0) return path.slice(0, view + 1);
  return path.replace(/[^/]*$/, '');
}

function withToken(url) {
  if (token) url.searchParams.set('token', token);
  return url;
}

/** An HTTP URL on this server, e.g. `httpUrl('api/sessions')`. */
export function httpUrl(path) {
  return withToken(new URL(rootPath() + path, location.origin)).href;
}

/** A WebSocket URL on this server, e.g. `wsUrl('ws/lab/browser-1')`. */
export function wsUrl(path) {
  const url = new URL(httpUrl(path));
  url.protocol = url.protocol === 'https:' ? 'wss:' : 'ws:';
  return url.href;
}

/** The link to one session's live view. */
export function viewUrl(session) {
  return withToken(new URL(`${rootPath()}s/${encodeURIComponent(session)}`, location.origin)).href;
}

/** The session of a `/s/{session}` page (percent-decoded), or null on other pages. */
export function sessionFromLocation() {
  const path = location.pathname;
  const view = path.lastIndexOf('/s/');
  if (view < 0) return null;
  const segment = path.slice(view + 3).split('/')[0];
  try {
    return decodeURIComponent(segment) || null;
  } catch {
    return null;
  }
}

/** A GET that answers JSON, or throws with the status. */
export async function getJson(path) {
  const response = await fetch(httpUrl(path), { cache: 'no-store' });
  if (!response.ok) throw new Error(`${path}: HTTP ${response.status}`);
  return response.json();
}
