"""The reader study (``fedtwin review``): a radiologist at a hospital reads a blinded,
shuffled mix of the hospital's own images and twin images in a browser, and says for each
whether it is real or synthetic, how realistic it looks (1-5) and which class it shows.

- ``store``: the study on the hospital's disk (SQLite): the images shown, the readers,
  their readings; a reader can stop and resume.
- ``app``: the web app (FastAPI and Jinja2 templates), served on 127.0.0.1 by default.
- ``stats``: what leaves the hospital (counts per class, no image, no name) and how the
  consortium pools them: accuracy at telling real from synthetic with its confidence
  interval, realism of real vs twin images, label agreement.
- ``commands``: ``fedtwin review serve|summary|pool``.
"""
