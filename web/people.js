// Who is in the session, in join order, live: the ack's list, then `user:joined` and
// `user:left`. Browser viewers join under a `viewer-` name (view.js) and are shown as such.

export const VIEWER_PREFIX = 'viewer-';

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
      const viewer = name.startsWith(VIEWER_PREFIX);
      li.className = viewer ? 'viewer' : 'editor';
      const dot = document.createElement('span');
      dot.className = 'dot';
      const text = document.createElement('span');
      text.className = 'name';
      text.textContent = name;
      li.append(dot, text);
      const tags = [];
      if (name === this.self) tags.push('you');
      if (viewer) tags.push('browser');
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
