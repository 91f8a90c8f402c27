window.cohortErrors=[];
window.addEventListener('error',function(e){var t=e.target;
window.cohortErrors.push(t&&t.tagName?('resource '+t.tagName):String(e.message));},true);
