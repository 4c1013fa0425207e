// Who is in the session, in join order, live: the ack's list, then `user:joined` and
// `user:left`. A bench page joins under a `browser-` name, or a `watching-` one while it is
// read-only (view.js), and is shown as such.

/** The name prefix of a bench page that may edit. */
export const BROWSER_PREFIX = 'browser-';
/** The name prefix of a bench page that only watches (read-only). */
export const WATCHING_PREFIX = 'watching-';

export class People {
  /** @param {HTMLUListElement} list */
  constructor(list) {
    this.list = list;
    this.names = [];
    this.self = null;
  }

  reset(names, self) {
    this.names = [...new Set(names)];
    this.self = self;
    this.render();
  }

  joined(name) {
    if (!this.names.includes(name)) this.names.push(name);
    this.render();
  }

  left(name) {
    this.names = this.names.filter((n) => n !== name);
    this.render();
  }

  render() {
    const rows = this.names.map((name) => {
      const li = document.createElement('li');
      li.dataset.user = name;
      const watching = name.startsWith(WATCHING_PREFIX);
      const browser = watching || name.startsWith(BROWSER_PREFIX);
      li.className = watching ? 'watching' : browser ? 'browser' : 'editor';
      const dot = document.createElement('span');
      dot.className = 'dot';
      const text = document.createElement('span');
      text.className = 'name';
      text.textContent = name;
      li.append(dot, text);
      const tags = [];
      if (name === this.self) tags.push('you');
      if (watching) tags.push('watching');
      else if (browser) tags.push('browser');
      if (tags.length) {
        const tag = document.createElement('span');
        tag.className = 'tag';
        tag.textContent = tags.join(', ');
        li.append(tag);
      }
      return li;
    });
    this.list.replaceChildren(...rows);
    this.list.dataset.count = String(this.names.length);
  }
}
